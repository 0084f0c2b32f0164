"""Stage `visor@<model>`: VISOR object accuracy of one evaluated model on SR2D spatial prompts (SPEC §3.6).

Samples ``visor.images_per_prompt`` images for each scored SR2D prompt (all 25,280, or a seeded subset of
``profiles.<p>.visor.max_prompts``) with the model's MultiGen sampler settings, detects the prompt's two
objects with OWL-ViT, and scores OA, OA(A), OA(B), VISOR_cond, VISOR_uncond and VISOR_1..J.

Usage: ``python -m stages.visor MODEL`` (MODEL a key of ``eval_models``); multi-GPU:
``accelerate launch -m stages.visor MODEL`` (ranks split the shards of each phase).
Deps: the model's weights, data/categories/coco.txt (SR2D's 80 names).
Outs: artifacts/visor/<MODEL>/{samples,detections}/ (Parquet shards, persist: resumes after a kill),
artifacts/visor_images/<MODEL>.csv (each image's outcome: the units of the compare stage),
metrics/visor/<MODEL>.json.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.datasets.categories import load_categories
from pipeline.eval_models import eval_model
from pipeline.models import component_hashes
from pipeline.multigen.detection import detect_prompt_set, detector_fingerprint, load_detector
from pipeline.paths import MODELS_DIR
from pipeline.runtime import (check_failure_rate, dist_info, rank_device, release_memory, run_stage, stage_argument,
                              wait_for_everyone, write_json)
from pipeline.sampling.sampler import open_sampler, sample_prompt_set, sampler_record
from pipeline.sampling.settings import SamplingCfg, SamplingScale
from pipeline.visor import PROMPT_SET, SPATIAL_SIZE, VisorCfg, VisorScale, spatial_prompts
from pipeline.visor_scoring import detection_outcomes, scores_of_outcomes
from pipeline.visor_failures import REMEDIES, RETRIED, report_lines

log = logging.getLogger("stages.visor")
IMAGES = Path("artifacts/visor_images")


def main(key: str) -> None:
    params = load_params()
    visor, scale = section(params, "visor", VisorCfg), section(params, "profile.visor", VisorScale)
    sampling = replace(section(params, "profile.sampling", SamplingScale),
                       images_per_prompt=visor.images_per_prompt, max_prompts=None)
    model, ref = eval_model(params, key)
    seed, dist, device = int(params["seed"]), dist_info(), rank_device()
    models_dir = MODELS_DIR
    prompts = spatial_prompts(load_categories("coco"), scale.max_prompts, seed)
    out, det = Path("artifacts/visor") / key, scale.detection
    # the detector is loaded first: a wrong reference fails before hours of sampling, not after
    detector = load_detector(det.detector, models_dir, device, det.dtype, det.image_backend)
    log.info("%s: %d SR2D prompts x %d images", key, len(prompts), visor.images_per_prompt)
    sampler = open_sampler(ref, model, models_dir,
                           section(params, "sampling", SamplingCfg), sampling, seed, device)
    record = sampler_record(sampler, ref)
    sample_prompt_set(sampler, PROMPT_SET, prompts, out / "samples", component_hashes(sampler.pipe), dist.rank,
                      dist.world_size)
    del sampler
    release_memory()
    wait_for_everyone()
    detect_prompt_set(detector, out / "samples", out / "detections", visor.query_template, det,
                      detector_fingerprint(detector, det, visor.query_template), dist.rank, dist.world_size,
                      keep_centers=True)
    wait_for_everyone()
    if not dist.is_main:
        return
    outcomes = detection_outcomes(out / "detections", prompts, visor)
    scores = scores_of_outcomes(outcomes, len(prompts), visor.images_per_prompt)
    IMAGES.mkdir(parents=True, exist_ok=True)
    outcomes.to_csv(IMAGES / f"{key}.csv", index=False)
    write_json(f"metrics/visor/{key}.json", {
        **record, "detector": det.detector, "threshold": visor.threshold, "seed": seed, "prompts": len(prompts),
        "prompts_total": SPATIAL_SIZE, "images_per_prompt": visor.images_per_prompt, **scores})
    log.info("%s VISOR: OA %.2f, VISOR_uncond %.2f, VISOR_cond %.2f (%d images scored)", key, scores["oa"],
             scores["visor_uncond"], scores["visor_cond"], scores["images_scored"])
    failures = report_lines(key, out, scores["images_missing"])
    check_failure_rate(failures, scores["images_expected"], visor.max_failed_rate, f"{key} VISOR images",
                       "visor.max_failed_rate", f"see the `error` columns of {out}/samples and {out}/detections",
                       retried=RETRIED, remedies=REMEDIES)


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "MODEL", "a key of eval_models in params.yaml"))
