"""Stage `grounding_eval@<model>`: how much of each category token's attention lies on that category.

Usage: ``python -m stages.grounding_eval MODEL`` (MODEL a key of ``eval_models`` with the plain SD sampler).
The first ``num_prompts`` MultiGen prompts x ``images_per_prompt`` images are generated again by the
sampler (same seeds as the ``sample`` stage) while cross-attention is recorded; Grounded-SAM segments each
category on the generated image; the share of the category tokens' attention inside its mask is averaged
per resolution group. Outs: metrics/grounding/<MODEL>.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.attention_maps.grounding_eval import (GROUNDING_FAILURES, GroundingEvalCfg, GroundingEvalScale,
                                                    compare_with_samples, grounding_rows, summarize_grounding)
from pipeline.attention_maps.recording import load_sampler
from pipeline.config import load_params, section
from pipeline.failures import report_failures
from pipeline.datasets.multigen_files import PROMPTS_DIR, load_prompt_set
from pipeline.masks.jobs import Grounder
from pipeline.masks.models import GroundingDetector, load_segmenter
from pipeline.masks.params import GroundingCfg, MasksScale
from pipeline.models import inference_dtype
from pipeline.paths import MODELS_DIR
from pipeline.runtime import check_failure_rate, run_stage, stage_argument, write_json
from pipeline.sampling.items import prompt_items

log = logging.getLogger("stages.grounding_eval")
# The stage keeps no rows between runs: its next run computes every category again.
RETRIED = set(GROUNDING_FAILURES)
REMEDIES = {"missing_image": "the image was not generated (its sampling failed); the next run samples it again, "
                             "and a nan_image or token_indices_failed fails the same way"}


def main(key: str) -> None:
    params = load_params()
    cfg = section(params, "grounding_eval", GroundingEvalCfg)
    scale = section(params, "profile.grounding_eval", GroundingEvalScale)
    gsam, masks = section(params, "grounding", GroundingCfg), section(params, "profile.masks", MasksScale)
    sampler, ref = load_sampler(params, key)
    models_dir, device = MODELS_DIR, sampler.pipe.unet.device
    dtype = inference_dtype(masks.dtype, device)
    grounder = Grounder(GroundingDetector.load(masks.detector, models_dir, device, dtype),
                        load_segmenter(masks.segmenter, models_dir, device, dtype),
                        gsam.box_threshold, gsam.text_threshold, masks.batch_size, sampler.size)
    metrics = {"model": ref.model, "unet": ref.unet or "", "note": ref.note, "detector": masks.detector,
               "segmenter": masks.segmenter, "box_threshold": gsam.box_threshold,
               "text_threshold": gsam.text_threshold, "images_per_prompt": scale.images_per_prompt,
               "steps": sampler.scale.num_inference_steps, "size": sampler.size, "seed": sampler.seed,
               "share_over": "all denoising steps, heads and layers of each group; category sub-tokens summed"}
    rows = []
    for name in scale.prompt_sets:
        prompts = load_prompt_set(PROMPTS_DIR / f"{name}.json", scale.num_prompts)
        items = prompt_items(name, prompts, scale.images_per_prompt)
        set_rows, samples = grounding_rows(sampler, grounder, items, cfg.groups)
        rows += set_rows
        same = compare_with_samples(Path("artifacts/samples") / key / name, samples, items)
        metrics.update({f"{name}_prompts": len(prompts), **{f"{name}_{k}": v for k, v in same.items()}})
    metrics.update(summarize_grounding(rows, cfg.groups))
    write_json(f"metrics/grounding/{key}.json", metrics)
    failures = report_failures(log, rows, lambda row: f"{row['image_id']}:{row['phrase']}", RETRIED,
                               where=f"grounding_eval@{key}", remedies=REMEDIES, failed=GROUNDING_FAILURES,
                               unit="categories", id_name="image:category")
    check_failure_rate(failures.counts, metrics["categories"], gsam.max_failed_rate,
                       f"grounding_eval {key} categories", "grounding.max_failed_rate",
                       f"the warning above names them (status_* counts: metrics/grounding/{key}.json)",
                       retried=RETRIED, remedies=REMEDIES)
    log.info("%s: %d of %d categories scored; mean share %.3f (uniform attention: %.3f)", key,
             metrics["categories_scored"], metrics["categories"], metrics["share_mean"], metrics["mask_area_mean"])


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "MODEL", "a key of eval_models with the plain SD sampler"))
