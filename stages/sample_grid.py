"""Stage `sample_grid`: generated images of the evaluated models side by side, with the detector's verdict.

For each MultiGen prompt set and for VISOR's SR2D prompts: one row per model (``sample_grid.models``,
default every key of ``eval_models``), one column per prompt (the first ``sample_grid.num_prompts``), image
``sample_grid.image_index`` of each prompt, which has the same seed in every row. Under each image: for
MultiGen, how many of the prompt's objects the detector found above ``multigen.threshold`` and which it
missed; for SR2D, which objects were found and whether the relation holds.
Deps: artifacts/samples/, artifacts/detections/, artifacts/visor/.
Outs: plots/samples/<set>.png (and sr2d.png), metrics/sample_grid.json.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.config import ConfigError, load_params, section
from pipeline.datasets.categories import load_categories
from pipeline.datasets.multigen_files import PROMPTS_DIR, MultiGenPrompt, load_prompt_set
from pipeline.multigen.settings import MultiGenCfg
from pipeline.runtime import run_stage, stage_argument, write_json
from pipeline.sample_grid import (SampleGridCfg, VerdictRule, grid_cells, grid_models, multigen_rule,
                                  sample_grid_figure, spatial_rule)
from pipeline.sampling.settings import SamplingScale
from pipeline.visor import PROMPT_SET as SR2D
from pipeline.visor import VisorCfg, VisorScale, spatial_prompts

log = logging.getLogger("stages.sample_grid")
OUT = Path("plots/samples")


def write_grid(name: str, label: str, models: list[str], prompts: list[MultiGenPrompt],
               dirs: dict[str, tuple[Path, Path]], cfg: SampleGridCfg, rule: VerdictRule, metrics: dict) -> None:
    """Write plots/samples/<name>.png from each model's (sample dir, detection dir) and count its empty cells."""
    if len(prompts) < cfg.num_prompts:
        log.info("%s: %d prompts, fewer than sample_grid.num_prompts = %d; all are shown", name, len(prompts),
                 cfg.num_prompts)
    cells = {m: grid_cells(*dirs[m], prompts, cfg.image_index, cfg.cell_size, rule) for m in models}
    title = f"{label}: image {cfg.image_index} of each prompt, same seed in every row"
    (OUT / f"{name}.png").write_bytes(sample_grid_figure(cells, prompts, title))
    empty = sum(c.image is None for row in cells.values() for c in row)
    metrics[f"{name}_prompts"], metrics[f"{name}_cells_without_image"] = len(prompts), empty
    if empty:
        log.warning("%s: %d of %d cells have no image (their captions say why)", name, empty,
                    len(prompts) * len(models))
    log.info("%s: %s (%d models x %d prompts)", name, OUT / f"{name}.png", len(models), len(prompts))


def main() -> None:
    params = load_params()
    cfg = section(params, "sample_grid", SampleGridCfg)
    mg, visor = section(params, "multigen", MultiGenCfg), section(params, "visor", VisorCfg)
    scale = section(params, "profile.sampling", SamplingScale)
    models = grid_models(cfg, params["eval_models"])
    if cfg.image_index >= scale.images_per_prompt:
        last = scale.images_per_prompt - 1
        raise ConfigError(f"sample_grid.image_index: {cfg.image_index} is not a MultiGen image of this profile, "
                         f"which samples {scale.images_per_prompt} per prompt (indices 0..{last})")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    metrics = {"models": ",".join(models), "image_index": cfg.image_index, "threshold": mg.threshold,
               "visor_threshold": visor.threshold}
    for name in mg.prompt_sets:
        prompts = load_prompt_set(PROMPTS_DIR / f"{name}.json", scale.max_prompts)[: cfg.num_prompts]
        dirs = {m: (Path("artifacts/samples") / m / name, Path("artifacts/detections") / m / name) for m in models}
        write_grid(name, f"MultiGen {name}", models, prompts, dirs, cfg, multigen_rule(mg.threshold), metrics)
    if cfg.image_index >= visor.images_per_prompt:
        metrics[f"{SR2D}_skipped"] = (f"image_index {cfg.image_index}: VISOR samples {visor.images_per_prompt} "
                                      f"images per prompt (visor.images_per_prompt)")
        log.warning("%s grid skipped: %s", SR2D, metrics[f"{SR2D}_skipped"])
    else:
        max_prompts = section(params, "profile.visor", VisorScale).max_prompts
        prompts = spatial_prompts(load_categories("coco"), max_prompts, int(params["seed"]))[: cfg.num_prompts]
        dirs = {m: (Path("artifacts/visor") / m / "samples", Path("artifacts/visor") / m / "detections")
                for m in models}
        write_grid(SR2D, "VISOR SR2D", models, prompts, dirs, cfg, spatial_rule(visor.threshold), metrics)
    write_json("metrics/sample_grid.json", metrics)


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
