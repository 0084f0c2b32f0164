"""Export one training checkpoint's UNet as a model (stage ``checkpoint@<N>``, issue: checkpoints as models).

The run is the one whose final UNet is in ``artifacts/train/unet`` (its ``training_run.json`` names the run's
fingerprint); its checkpoints are in ``artifacts/train/checkpoints/<fingerprint>/checkpoint-<N>``. The export
is ``<out>/unet`` in diffusers layout (the EMA weights when the run kept an EMA, as the final UNet) and
``<out>/state.json`` (step, fingerprint, ema), which :func:`pipeline.eval_models.checkpoint_of` reads into
every evaluation metric of the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import InputDataError
from pipeline.training.checkpoints import CHECKPOINT_PREFIX, TRAINING_RUN_FILE, list_checkpoints, run_dir


def trained_run(unet_dir: Path) -> dict[str, Any]:
    """``{"fingerprint", "steps"}`` of the run that wrote the final UNet in ``unet_dir``."""
    path = Path(unet_dir) / TRAINING_RUN_FILE
    if not path.is_file():
        raise InputDataError(f"{path} is missing: the train stage has not finished; run `dvc repro train`")
    return json.loads(path.read_text())


def find_checkpoint(checkpoints_root: Path, run: dict[str, Any], step: int) -> Path:
    """The folder of ``checkpoint-<step>`` of ``run``; an error naming the steps the run kept and the fix
    when it is not there (a step the run does not save, one pruned by ``train.checkpoint_limit``, or a
    workspace whose training was restored from DVC's cache, not run: checkpoints are not DVC outputs)."""
    if not 0 < step <= int(run["steps"]):
        raise InputDataError(f"checkpoint_steps: step {step} is outside the training run (1..{run['steps']}); "
                             f"list steps the run saves (multiples of profiles.<p>.train.checkpoint_every)")
    key_dir = run_dir(Path(checkpoints_root), run["fingerprint"])
    path = key_dir / f"{CHECKPOINT_PREFIX}{step}"
    if (path / "state.json").is_file() and (path / "unet").is_dir():
        return path
    kept = [s for s, _ in list_checkpoints(key_dir)]
    raise InputDataError(
        f"{path} is missing (the run {run['fingerprint']} keeps steps {kept or 'none'} in {key_dir}): list only "
        f"steps it saves in checkpoint_steps (multiples of profiles.<p>.train.checkpoint_every; "
        f"train.checkpoint_limit keeps the newest), or, where the training was restored from DVC's cache and never "
        f"ran here, recompute its checkpoints with `dvc repro -f -s train`")


def export_checkpoint(checkpoint: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir/unet`` (the checkpoint's UNet; its EMA weights when it has ``ema.pt``) and
    ``out_dir/state.json``; returns the state written. The folder is built beside ``out_dir`` and renamed."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    state = json.loads((checkpoint / "state.json").read_text())
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ema = (checkpoint / "ema.pt").is_file()
    if ema:
        _save_ema_unet(checkpoint, tmp / "unet")
    else:
        shutil.copytree(checkpoint / "unet", tmp / "unet")
    exported = {"step": int(state["step"]), "fingerprint": state["fingerprint"], "ema": ema}
    (tmp / "state.json").write_text(json.dumps(exported, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return exported


def _save_ema_unet(checkpoint: Path, unet_out: Path) -> None:
    """Load the checkpoint's UNet, copy its EMA shadow weights into it and save it to ``unet_out``."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    ema = EMAModel(unet.parameters(), model_cls=type(unet), model_config=unet.config)
    ema.load_state_dict(torch.load(checkpoint / "ema.pt", map_location="cpu", weights_only=True))
    ema.copy_to(unet.parameters())
    unet.save_pretrained(unet_out, safe_serialization=True)
