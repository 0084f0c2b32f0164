"""Training checkpoints, one folder per run key (SPEC §1.5).

Layout: ``<root>/<run fingerprint>/checkpoint-<step>/`` with ``unet/`` in diffusers layout, ``optimizer.pt``,
optional ``ema.pt`` and ``scaler.pt``, and ``state.json`` (step, fingerprint, number of processes, loss curves
so far), plus ``<root>/<run fingerprint>/run.json`` saying which settings the key stands for and when it was
last written. A run reads and writes only its own key's folder: trying other settings starts another key
and leaves every finished checkpoint of the others in place (deleting them is an explicit act). Checkpoints
are written atomically; a run keeps the newest ``checkpoint_limit`` of its key up to its current step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
RUN_INFO_FILE = "run.json"  # in each key folder: the run's settings summary and times
TRAINING_RUN_FILE = "training_run.json"  # beside the final UNet: the fingerprint and steps of the run that made it


def run_dir(root: Path, fingerprint: str) -> Path:
    """The folder of one run key: ``<root>/<fingerprint>``; refuses a fingerprint that is not a plain name."""
    if not re.fullmatch(r"[0-9A-Za-z_-]+", fingerprint):
        raise ValueError(f"run fingerprint {fingerprint!r} is not a plain folder name")
    return Path(root) / fingerprint


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` (one key's folder) as (step, path), oldest first."""
    found = []
    for path in Path(ckpt_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        if step.isdigit() and (path / "state.json").is_file():
            found.append((int(step), path))
    return sorted(found)


def save_checkpoint(ckpt_dir: Path, step: int, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, ema: Any = None, scaler: Any = None, limit: int = 10) -> Path:
    """Write ``checkpoint-<step>`` atomically (temporary folder, then rename) and keep the newest ``limit`` up to
    ``step``; checkpoints past ``step`` (a longer run with the same settings) are left alone, so a shorter run
    never deletes the checkpoint it has just written."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = ckpt_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if ema is not None:
        torch.save(ema.state_dict(), tmp / "ema.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "state.json").write_text(json.dumps(state) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    up_to_step = [path for saved, path in list_checkpoints(ckpt_dir) if saved <= step]
    for old in up_to_step[:-limit] if limit > 0 else []:
        shutil.rmtree(old)
    log.info("saved %s", final)
    return final


def load_checkpoint(path: Path, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: Any = None,
                    scaler: Any = None) -> dict:
    """Load weights, optimizer (and EMA/scaler) state from ``path`` in place; return its ``state.json``."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(path / "unet" / "diffusion_pytorch_model.safetensors", device=str(_device_of(unet)))
    unet.load_state_dict(weights)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if ema is not None:
        ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=True))
        ema.to(_device_of(unet))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())


def _device_of(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter."""
    return next(module.parameters()).device


def _checkpoint_fingerprint(path: Path) -> str | None:
    """The fingerprint in a checkpoint's ``state.json`` (None when unreadable: a checkpoint cut short)."""
    try:
        return json.loads((path / "state.json").read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


def find_resume(ckpt_dir: Path, fingerprint: str, max_steps: int) -> Path | None:
    """Latest checkpoint in ``ckpt_dir`` made by this run (its ``state.json`` names ``fingerprint``) with
    step <= ``max_steps``, or None; reads only."""
    usable = None
    for step, path in list_checkpoints(ckpt_dir):
        if _checkpoint_fingerprint(path) == fingerprint and step <= max_steps:
            usable = path
    return usable


def record_run(key_dir: Path, fingerprint: str, summary: dict[str, Any], step: int) -> Path:
    """Write ``<key_dir>/run.json`` atomically: the fingerprint, ``summary`` (the settings the key stands for
    and how this run was launched), the step of the checkpoint just saved, when the key was first and last
    written."""
    key_dir = Path(key_dir)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    created = (read_run_info(key_dir) or {}).get("created", now)
    info = {"fingerprint": fingerprint, **summary, "last_saved_step": step, "created": created, "updated": now}
    key_dir.mkdir(parents=True, exist_ok=True)
    tmp = key_dir / f".tmp-{RUN_INFO_FILE}"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, key_dir / RUN_INFO_FILE)
    return key_dir / RUN_INFO_FILE


def read_run_info(key_dir: Path) -> dict[str, Any] | None:
    """The ``run.json`` of a key folder, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(key_dir) / RUN_INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def list_runs(root: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """The key folders under ``root`` (those holding a ``run.json`` or a checkpoint) with their ``run.json``
    (None when missing), sorted by folder name; reads only."""
    keys = [p for p in Path(root).glob("*") if p.is_dir() and not p.name.startswith(".")
            and ((p / RUN_INFO_FILE).is_file() or list_checkpoints(p))]
    return [(key, read_run_info(key)) for key in sorted(keys)]
