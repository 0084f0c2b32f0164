"""Stage `sample_grid`: MultiGen images of the evaluated models side by side, with the detector's verdict.

For each prompt set: one row per model (``sample_grid.models``, default every key of ``eval_models``), one
column per prompt (the first ``sample_grid.num_prompts``), image ``sample_grid.image_index`` of each prompt,
which has the same seed in every row. Under each image: how many of the prompt's objects the detector found
above ``multigen.threshold`` and which it missed. Deps: artifacts/samples/, artifacts/detections/.
Outs: plots/samples/<set>.png, metrics/sample_grid.json.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.multigen import MultiGenCfg, load_prompt_set
from pipeline.runtime import setup_logging, stage_argument, write_json
from pipeline.sample_grid import SampleGridCfg, grid_cells, grid_models, sample_grid_figure
from pipeline.sampling import SamplingScale

log = logging.getLogger("stages.sample_grid")
OUT = Path("plots/samples")


def main() -> None:
    setup_logging()
    params = load_params()
    cfg = section(params, "sample_grid", SampleGridCfg)
    mg = section(params, "multigen", MultiGenCfg)
    scale = section(params, "profile.sampling", SamplingScale)
    models = grid_models(cfg, params["eval_models"])
    if cfg.image_index >= scale.images_per_prompt:
        raise ValueError(f"sample_grid.image_index: {cfg.image_index} is not an image of this profile, which "
                         f"samples {scale.images_per_prompt} per prompt (indices 0..{scale.images_per_prompt - 1})")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    metrics = {"models": ",".join(models), "image_index": cfg.image_index, "threshold": mg.threshold}
    for name in mg.prompt_sets:
        prompts = load_prompt_set(mg.prompts_dir / f"{name}.json", scale.max_prompts)[: cfg.num_prompts]
        cells = {m: grid_cells(Path("artifacts/samples") / m / name, Path("artifacts/detections") / m / name,
                               prompts, cfg.image_index, mg.threshold, cfg.cell_size) for m in models}
        title = f"MultiGen {name}: image {cfg.image_index} of each prompt, same seed in every row"
        (OUT / f"{name}.png").write_bytes(sample_grid_figure(cells, prompts, title))
        empty = sum(c.image is None for row in cells.values() for c in row)
        metrics[f"{name}_prompts"], metrics[f"{name}_cells_without_image"] = len(prompts), empty
        if empty:
            log.warning("%s: %d of %d cells have no image (their captions say why)", name, empty,
                        len(prompts) * len(models))
        log.info("%s: %s (%d models x %d prompts)", name, OUT / f"{name}.png", len(models), len(prompts))
    write_json("metrics/sample_grid.json", metrics)


if __name__ == "__main__":
    stage_argument(__doc__)
    main()
