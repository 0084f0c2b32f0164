"""Stage `latency@<model>`: seconds per image of a model under the original's and this pipeline's settings.

Usage: ``python -m stages.latency MODEL`` (a key of ``eval_models``). Times ``profiles.<p>.latency.images``
images of the first MultiGen prompts after ``warmup`` untimed calls, once with ``latency.original`` (the
published column's 50 steps, batch 1, fp32) and once with ``profiles.<p>.sampling`` (pipeline.photorealism.latency).
Deps: artifacts/data/multigen, the model's weights. Outs: metrics/latency/<MODEL>.json, with the hardware name:
the numbers hold for that machine only.
"""

from __future__ import annotations

import logging

import torch

from pipeline.config import load_params, section
from pipeline.datasets.multigen_files import PROMPTS_DIR, load_prompt_set
from pipeline.eval_models import eval_model
from pipeline.multigen.settings import MultiGenCfg
from pipeline.paths import MODELS_DIR
from pipeline.photorealism.latency import (LatencyCfg, LatencyScale, call_times, hardware_name, latency_record,
                                           timed_scale)
from pipeline.runtime import rank_device, run_stage, stage_argument, write_json
from pipeline.sampling.items import prompt_items
from pipeline.sampling.sampler import open_sampler
from pipeline.sampling.settings import SamplingCfg, SamplingScale

log = logging.getLogger("stages.latency")


def main(key: str) -> None:
    params = load_params()
    cfg, scale = section(params, "sampling", SamplingCfg), section(params, "profile.sampling", SamplingScale)
    latency, amount = section(params, "latency", LatencyCfg), section(params, "profile.latency", LatencyScale)
    model, ref = eval_model(params, key)
    device = rank_device()
    promptset = section(params, "multigen", MultiGenCfg).prompt_sets[0]
    items = prompt_items(promptset, load_prompt_set(PROMPTS_DIR / f"{promptset}.json", amount.images), 1)
    metrics = {"model": ref.model, "unet": ref.unet or "", "sampler": model.sampler, "hardware": hardware_name(device),
               "device": device.type, "torch": torch.__version__, "prompt_set": promptset}
    for name, timed in (("original", timed_scale(scale, latency.original)), ("pipeline", scale)):
        sampler = open_sampler(ref, model, MODELS_DIR, cfg, timed, int(params["seed"]), device)
        metrics[name] = latency_record(call_times(sampler, items, amount.images, amount.warmup), timed, sampler)
        log.info("latency@%s %s: %.3f s per image (%s)", key, name, metrics[name]["seconds_per_image"],
                 metrics["hardware"])
        del sampler
    write_json(f"metrics/latency/{key}.json", metrics)


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "MODEL", "a key of eval_models in params.yaml"))
