"""Stage `score@<model>`: MG1-MG5 (mean and std over image index) of one model (SPEC §3.4).

Usage: ``python -m stages.score MODEL``. Deps: artifacts/detections/<MODEL>/, the prompt files.
Outs: metrics/multigen/<MODEL>.json with flat keys ``<set>_mg1`` ... ``<set>_mg5``, ``<set>_mg1_std`` ...,
and what they were computed over (prompts, images per prompt, threshold, model references, failed and
missing images); plots/multigen_categories/<MODEL>.csv: per prompt set and category, the scored images
whose prompt names it and how many of them it was found in; artifacts/multigen_images/<MODEL>.csv: objects
found per image (the units the compare stage resamples).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.config import load_params, section
from pipeline.datasets.multigen_files import PROMPTS_DIR, load_prompt_set
from pipeline.eval_models import eval_model
from pipeline.failures import MISSING, prompt_image_id, report_failures
from pipeline.multigen.scoring import category_counts, format_row, found_grid, found_table, grid_scores
from pipeline.multigen.settings import MultiGenCfg, MultiGenScale
from pipeline.runtime import check_failure_rate, run_stage, stage_argument, write_json
from pipeline.sampling.settings import SamplingScale
from pipeline.store.shards import iter_rows

log = logging.getLogger("stages.score")
CATEGORIES, IMAGES = Path("plots/multigen_categories"), Path("artifacts/multigen_images")
COLUMNS = ["prompt_id", "image_index", "objects", "label_max_scores", "status"]


def remedies(key: str) -> dict[str, str]:
    """What fixes the detection rows this stage cannot score (statuses of pipeline.multigen.detection); this
    stage retries nothing itself, it scores what sample@ and detect@ wrote."""
    return {"detect_failed": f"retried by the next run of detect@{key}",
            "no_image": f"the sampling failed: sample@{key} retries sample_failed images on its next run, "
                        f"nan_image and token_indices_failed stay",
            "corrupt_image": f"not retried: the PNG in artifacts/samples/{key} does not decode; delete that shard "
                             f"and run `dvc repro -f -s sample@{key}`",
            MISSING: f"no detection row: sample@{key} and detect@{key} ran over fewer images; run them"}


def main(key: str) -> None:
    params = load_params()
    mg, det = section(params, "multigen", MultiGenCfg), section(params, "profile.multigen", MultiGenScale)
    scale = section(params, "profile.sampling", SamplingScale)
    model, ref = eval_model(params, key)
    metrics = {"model": ref.model, "unet": ref.unet or "", "note": ref.note, "sampler": model.sampler,
               "detector": det.detector, "threshold": mg.threshold, "images_per_prompt": scale.images_per_prompt,
               "steps": scale.num_inference_steps, "seed": int(params["seed"])}
    categories, images, failures = [], [], {}
    for name in mg.prompt_sets:
        num_prompts = len(load_prompt_set(PROMPTS_DIR / f"{name}.json", scale.max_prompts))
        rows = list(iter_rows(Path("artifacts/detections") / key / name, columns=COLUMNS))
        found, valid, seen = found_grid(rows, mg.threshold, num_prompts, scale.images_per_prompt)
        scores = grid_scores(found, valid, seen)
        images.append(found_table(name, found, valid))
        failures[name] = report_failures(log, rows, prompt_image_id, (), where=f"score@{key} {name} (left out of MG)",
                                         remedies=remedies(key), missing=scores["images_missing"], unit="images",
                                         id_name="prompt/image")
        categories.append(category_counts(rows, mg.threshold).assign(prompt_set=name))
        metrics[f"{name}_prompts"] = num_prompts
        metrics.update({f"{name}_{k}": v for k, v in scores.items()})
        log.info("%s %s MG1-MG5: %s (%d images scored)", key, name, format_row(scores), scores["images_scored"])
    write_json(f"metrics/multigen/{key}.json", metrics)
    CATEGORIES.mkdir(parents=True, exist_ok=True)
    table = pd.concat(categories, ignore_index=True)[["prompt_set", "category", "images", "found", "rate"]]
    table.to_csv(CATEGORIES / f"{key}.csv", index=False, float_format="%.4f")
    IMAGES.mkdir(parents=True, exist_ok=True)
    pd.concat(images, ignore_index=True).to_csv(IMAGES / f"{key}.csv", index=False)
    for name in mg.prompt_sets:
        check_failure_rate(failures[name].counts, metrics[f"{name}_images_expected"], mg.max_failed_rate,
                           f"{key}/{name} images", "multigen.max_failed_rate",
                           f"see the `error` column of artifacts/detections/{key}/{name}", remedies=remedies(key))


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "MODEL", "a key of eval_models in params.yaml"))
