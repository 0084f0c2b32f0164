"""Stage `compare`: every pair of models, the difference of each score with a paired-bootstrap interval.

Deps: artifacts/multigen_images/<model>.csv (stages score@, score_step@: objects found per image),
artifacts/visor_images/<model>.csv (stages visor@, visor_step@: each SR2D image's outcome),
plots/piebench/<backbone>.csv (stages piebench@, piebench_step@: metrics per image) and
plots/clip_score/<model>.csv (stages fid@, fid_step@: CLIP score per caption). Models: the keys of
eval_models then step_<N> for checkpoint_steps (MultiGen, CLIP score), the keys of edit_backbones then the
steps (PIE-Bench). Outs: metrics/compare.json: ``multigen.<set>.mg<k>.<a>-<b>``,
``visor.<score>.<a>-<b>``, ``piebench.<metric>.<a>-<b>`` and ``clip_score.<reference set>.<a>-<b>``
with ``diff`` (a minus b), ``low``, ``high`` (the compare.level interval), ``significant`` (the interval
excludes 0), the bootstrap ``p`` with ``p_holm`` and ``significant_holm`` (Holm's correction over the pairs of
one score), and ``...<model>.value``, so `dvc metrics diff` shows every comparison.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.compare.pairs import CompareCfg, compare_clip, compare_multigen, compare_piebench, compare_visor
from pipeline.config import InputDataError, load_params, section
from pipeline.eval_models import step_key
from pipeline.names import PIEBENCH_KEYS
from pipeline.runtime import run_stage, stage_argument, write_json

log = logging.getLogger("stages.compare")
IMAGES, VISOR = Path("artifacts/multigen_images"), Path("artifacts/visor_images")
PIEBENCH, CLIP = Path("plots/piebench"), Path("plots/clip_score")


def read_tables(folder: Path, models: list[str], stage: str) -> dict[str, pd.DataFrame]:
    """``{model: folder/<model>.csv}``; a missing table names the stage that writes it."""
    tables = {}
    for model in models:
        path = folder / f"{model}.csv"
        if not path.is_file():
            family = f"{stage}_step" if model.startswith("step_") else stage
            raise InputDataError(f"{path} is missing; run `dvc repro {family}@{model.removeprefix('step_')}`")
        tables[model] = pd.read_csv(path, keep_default_na=True)
    return tables


def significant_pairs(results: dict[str, Any]) -> tuple[int, int, int]:
    """(intervals that exclude 0, differences significant after Holm, all) pair comparisons in a nested
    result of :mod:`pipeline.compare.pairs`."""
    counts = [0, 0, 0]
    for value in results.values():
        if isinstance(value, dict) and "significant" in value:
            flags = (value["significant"], value.get("significant_holm", False), True)
            counts = [c + bool(f) for c, f in zip(counts, flags)]
        elif isinstance(value, dict):
            counts = [c + sub for c, sub in zip(counts, significant_pairs(value))]
    return counts[0], counts[1], counts[2]


def main() -> None:
    params = load_params()
    cfg = section(params, "compare", CompareCfg)
    steps = [step_key(s) for s in params.get("checkpoint_steps") or []]
    mg_models, edit_models = list(params["eval_models"]) + steps, list(params["edit_backbones"]) + steps
    multigen = compare_multigen(read_tables(IMAGES, mg_models, "score"), mg_models,
                                params["multigen"]["prompt_sets"], cfg)
    visor = compare_visor(read_tables(VISOR, mg_models, "visor"), mg_models,
                          int(params["visor"]["images_per_prompt"]), cfg)
    piebench = compare_piebench(read_tables(PIEBENCH, edit_models, "piebench"), edit_models, PIEBENCH_KEYS, cfg)
    clip_tables = read_tables(CLIP, mg_models, "fid")
    references = list(dict.fromkeys(r for t in clip_tables.values() for r in t["reference"]))
    clip = compare_clip(clip_tables, mg_models, references, cfg)
    write_json("metrics/compare.json", {"level": cfg.level, "reps": cfg.reps, "seed": cfg.seed,
                                        "multigen": multigen, "visor": visor, "piebench": piebench,
                                        "clip_score": clip})
    for name, result in (("MultiGen", multigen), ("VISOR", visor), ("PIE-Bench", piebench), ("CLIP score", clip)):
        hits, holm_hits, total = significant_pairs(result)
        log.info("%s: %d of %d pairwise differences are beyond the noise (their %.0f%% interval excludes 0), "
                 "%d after Holm's correction per score", name, hits, total, 100 * cfg.level, holm_hits)


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
