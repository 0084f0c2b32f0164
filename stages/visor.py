"""Stage `visor@<model>`: VISOR object accuracy of one evaluated model on SR2D spatial prompts (SPEC §3.6).

Samples ``visor.images_per_prompt`` images for each scored SR2D prompt (all 25,280, or a seeded subset of
``profiles.<p>.visor.max_prompts``) with the model's MultiGen sampler settings, detects the prompt's two
objects with OWL-ViT, and scores OA, OA(A), OA(B), VISOR_cond, VISOR_uncond and VISOR_1..J.

Usage: ``python -m stages.visor MODEL`` (MODEL a key of ``eval_models``); multi-GPU:
``accelerate launch -m stages.visor MODEL`` (ranks split the shards of each phase).
Deps: the model's weights, data/categories/coco.txt (SR2D's 80 names).
Outs: artifacts/visor/<MODEL>/{samples,detections}/ (Parquet shards, persist: resumes after a kill),
metrics/visor/<MODEL>.json.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.benchmarks import load_categories
from pipeline.config import active_profile, load_params, section
from pipeline.multigen import detect_prompt_set, detector_fingerprint, load_detector
from pipeline.runtime import (check_failure_rate, dist_info, rank_device, setup_logging, stage_argument,
                              wait_for_everyone, write_json)
from pipeline.sampling import (EvalModel, EvalModelRef, Sampler, SamplingCfg, SamplingScale, component_hashes,
                               load_pipeline, resolve_dtype, sample_prompt_set)
from pipeline.shards import iter_rows
from pipeline.visor import PROMPT_SET, SPATIAL_SIZE, VisorCfg, VisorScale, spatial_prompts, visor_scores

log = logging.getLogger("stages.visor")
COLUMNS = ["prompt_id", "image_index", "status", "box_scores", "box_labels", "box_centers"]


def sample(key: str, params: dict, prompts: list, out_dir: Path) -> dict:
    """Sample every image of ``prompts`` with model ``key`` into ``out_dir``; returns the sampler's settings."""
    cfg, scale = section(params, "sampling", SamplingCfg), section(params, "profile.sampling", SamplingScale)
    visor = section(params, "visor", VisorCfg)
    scale = replace(scale, images_per_prompt=visor.images_per_prompt, max_prompts=None)
    model = section(params, f"eval_models.{key}", EvalModel)
    ref = section(params, f"profile.eval_models.{key}", EvalModelRef)
    dist, device = dist_info(), rank_device()
    pipe = load_pipeline(ref, model.sampler, Path(active_profile(params)["models_dir"]), cfg,
                         resolve_dtype(scale.dtype, device), device)
    sampler = Sampler(pipe, model.sampler, cfg, scale, int(params["seed"]))
    sample_prompt_set(sampler, PROMPT_SET, prompts, out_dir, component_hashes(pipe), dist.rank, dist.world_size)
    settings = {"model": ref.model, "unet": ref.unet or "", "note": ref.note, "sampler": model.sampler,
                "steps": scale.num_inference_steps, "guidance_scale": cfg.guidance_scale, "size": sampler.size,
                "dtype": str(pipe.unet.dtype)}
    del sampler, pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return settings


def main(key: str) -> None:
    setup_logging()
    params = load_params()
    visor, scale = section(params, "visor", VisorCfg), section(params, "profile.visor", VisorScale)
    seed = int(params["seed"])
    prompts = spatial_prompts(load_categories("coco"), scale.max_prompts, seed)
    out = Path("artifacts/visor") / key
    dist = dist_info()
    det = scale.detection  # loaded first: a wrong reference fails before hours of sampling, not after
    detector = load_detector(det.detector, Path(active_profile(params)["models_dir"]), rank_device(), det.dtype,
                             det.image_backend)
    log.info("%s: %d SR2D prompts x %d images", key, len(prompts), visor.images_per_prompt)
    settings = sample(key, params, prompts, out / "samples")
    wait_for_everyone()
    detect_prompt_set(detector, out / "samples", out / "detections", visor.query_template, det,
                      detector_fingerprint(detector, det, visor.query_template),
                      dist.rank, dist.world_size, keep_centers=True)
    wait_for_everyone()
    if not dist.is_main:
        return
    scores = visor_scores(iter_rows(out / "detections", columns=COLUMNS), prompts, visor.threshold,
                          visor.images_per_prompt)
    metrics = {**settings, "detector": det.detector, "threshold": visor.threshold, "seed": seed,
               "prompts": len(prompts), "prompts_total": SPATIAL_SIZE, "images_per_prompt": visor.images_per_prompt,
               **scores}
    write_json(f"metrics/visor/{key}.json", metrics)
    log.info("%s VISOR: OA %.2f, VISOR_uncond %.2f, VISOR_cond %.2f (%d images scored)", key, scores["oa"],
             scores["visor_uncond"], scores["visor_cond"], scores["images_scored"])
    check_failure_rate(scores["images_failed"] + scores["images_missing"], scores["images_expected"],
                       visor.max_failed_rate, f"{key} VISOR images", "visor.max_failed_rate")


if __name__ == "__main__":
    main(stage_argument(__doc__, "MODEL", "a key of eval_models in params.yaml"))
