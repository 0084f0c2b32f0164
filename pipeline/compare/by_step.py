"""Scores against training step: the base model (step 0), each exported checkpoint ``step_<N>`` and the final
``trained`` UNet, one row each, from the evaluation stages' metrics (stage ``by_step`` -> plots/by_step.csv):
MultiGen, VISOR, attention grounding, PIE-Bench, and FID with CLIP score, so that a change in grounding can be read
beside what it costs in image quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from pipeline.eval_models import step_key
from pipeline.names import MG_LEVELS, PIEBENCH_KEYS

STEP_COLUMNS = ["step", "model"]
# metrics/visor key -> by_step column: TokenCompose's Object Accuracy, then VISOR's own scores
VISOR_BY_STEP = {"oa": "visor_oa", "visor_uncond": "visor_uncond", "visor_cond": "visor_cond"}


def read_json(path: Path) -> dict[str, Any]:
    """A metrics file, or ``{}`` when the stage that writes it is not in the pipeline (no such model)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def step_models(base: str | None, steps: Sequence[int], final_step: int | None) -> list[tuple[int, str]]:
    """(step, model key) in step order: ``base`` at 0 (when the base model is evaluated), the checkpoints,
    ``trained`` at the run's last step."""
    rows = [(0, base)] if base else []
    rows += [(int(s), step_key(s)) for s in sorted(steps)]
    if final_step is not None and int(final_step) not in {s for s, _ in rows}:
        rows.append((int(final_step), "trained"))
    return rows


def step_row(metrics_dir: Path, step: int, model: str, prompt_sets: Sequence[str],
             fid_sets: Sequence[str] = ()) -> dict[str, Any]:
    """One row: MG1–MG5 with std per prompt set, VISOR's OA, VISOR_uncond and VISOR_cond (``visor_oa``, ...),
    the mean grounding share, the PIE-Bench table values, and FID and CLIP score per FID reference set (empty
    where a model was not evaluated by that family)."""
    row: dict[str, Any] = {"step": step, "model": model}
    multigen = read_json(metrics_dir / "multigen" / f"{model}.json")
    for name in prompt_sets:
        for k in MG_LEVELS:
            for suffix in ("", "_std"):
                row[f"{name}_mg{k}{suffix}"] = multigen.get(f"{name}_mg{k}{suffix}")
    visor = read_json(metrics_dir / "visor" / f"{model}.json")
    row.update({column: visor.get(name) for name, column in VISOR_BY_STEP.items()})
    row["grounding_share_mean"] = read_json(metrics_dir / "grounding" / f"{model}.json").get("share_mean")
    piebench = read_json(metrics_dir / "piebench" / f"{model}.json")
    row.update({name: piebench.get(name) for name, _ in PIEBENCH_KEYS.values()})
    fid = read_json(metrics_dir / "fid" / f"{model}.json")
    for name in fid_sets:
        row[f"fid_{name}"] = fid.get(name, {}).get("fid")
        row[f"clip_score_{name}"] = fid.get(name, {}).get("clip_score")
    return row


def by_step_table(metrics_dir: Path, models: Sequence[tuple[int, str]], prompt_sets: Sequence[str],
                  fid_sets: Sequence[str] = ()) -> pd.DataFrame:
    """The rows of :func:`step_row` for each (step, model) of :func:`step_models`."""
    return pd.DataFrame([step_row(Path(metrics_dir), s, m, prompt_sets, fid_sets) for s, m in models])


def base_model(eval_models: Mapping[str, Any], refs: Mapping[str, Any], sd_model: str) -> str | None:
    """The evaluated model that is the train stage's starting point (step 0): plain SD sampling of
    ``sd_model`` with its own UNet; None when no evaluated model is."""
    for key, entry in eval_models.items():
        ref = refs.get(key) or {}
        if entry.get("sampler", "sd") == "sd" and ref.get("model") == sd_model and not ref.get("unet"):
            return key
    return None
