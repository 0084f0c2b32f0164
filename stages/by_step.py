"""Stage `by_step`: the scores of the base model, each checkpoint and the trained model against training step.

Deps: metrics/multigen, metrics/grounding, metrics/piebench, metrics/fid (the evaluation stages of every model)
and metrics/train.json (the run's last step). Outs: plots/by_step.csv, one row per step: MG1–MG5 with their std
per prompt set, the mean grounding share, the PIE-Bench table values, FID and CLIP score per reference set
(empty where that family did not evaluate the model), drawn by `dvc plots show` (the by-step plots of dvc.yaml) and in the report.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.compare.by_step import base_model, by_step_table, read_json, step_models
from pipeline.config import load_params
from pipeline.runtime import run_stage, stage_argument

log = logging.getLogger("stages.by_step")
OUT = Path("plots/by_step.csv")


def main() -> None:
    params = load_params()
    profile = params["profiles"][params["profile"]]
    base = base_model(params["eval_models"], profile.get("eval_models", {}), profile["sd_model"])
    final = read_json(Path("metrics/train.json")).get("steps")
    models = step_models(base, params.get("checkpoint_steps") or [], final)
    fid_sets = list((profile.get("fid") or {}).get("references") or {})
    table = by_step_table(Path("metrics"), models, params["multigen"]["prompt_sets"], fid_sets)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(OUT, index=False, float_format="%.6g")
    log.info("by_step: %d rows (%s)", len(table), ", ".join(f"{m}@{s}" for s, m in models))


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
