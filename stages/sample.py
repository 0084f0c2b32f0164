"""Stage `sample@<model>`: MultiGen images of one evaluated model for every prompt set (SPEC §3.2).

Usage: ``python -m stages.sample MODEL`` (MODEL a key of ``eval_models``); multi-GPU:
``accelerate launch -m stages.sample MODEL`` (each rank writes its own shards).
Deps: artifacts/data/multigen/<set>.json, the model's weights (``eval_models.<MODEL>.dep``).
Outs: artifacts/samples/<MODEL>/<set>/ (Parquet shards, persist: resumes after a kill),
metrics/sample/<MODEL>.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.datasets.multigen_files import PROMPTS_DIR, load_prompt_set
from pipeline.eval_models import eval_model
from pipeline.failures import prompt_image_id, report_failures
from pipeline.models import component_hashes
from pipeline.multigen.settings import MultiGenCfg
from pipeline.paths import MODELS_DIR
from pipeline.runtime import (check_failure_rate, dist_info, rank_device, run_stage, stage_argument, wait_for_everyone,
                              write_json)
from pipeline.sampling.remedies import SAMPLE_REMEDIES, SAMPLE_RETRIED
from pipeline.sampling.sampler import open_sampler, sample_prompt_set, sampler_record
from pipeline.sampling.settings import SamplingCfg, SamplingScale
from pipeline.store.shards import read_shards

log = logging.getLogger("stages.sample")


def main(key: str) -> None:
    params = load_params()
    cfg, scale = section(params, "sampling", SamplingCfg), section(params, "profile.sampling", SamplingScale)
    model, ref = eval_model(params, key)
    mg = section(params, "multigen", MultiGenCfg)
    dist, device = dist_info(), rank_device()
    sampler = open_sampler(ref, model, MODELS_DIR, cfg, scale, int(params["seed"]),
                           device)
    weights = component_hashes(sampler.pipe)
    metrics = {**sampler_record(sampler, ref), "images_per_prompt": scale.images_per_prompt, "seed": sampler.seed,
               "compiled": scale.compile and model.sampler == "sd"}
    for name in mg.prompt_sets:
        prompts = load_prompt_set(PROMPTS_DIR / f"{name}.json", scale.max_prompts)
        out_dir = Path("artifacts/samples") / key / name
        start = time.perf_counter()
        sample_prompt_set(sampler, name, prompts, out_dir, weights, dist.rank, dist.world_size)
        log.info("%s/%s: %d prompts sampled in %.1fs", key, name, len(prompts), time.perf_counter() - start)
        metrics[f"{name}_prompts"] = len(prompts)
    wait_for_everyone()
    if not dist.is_main:
        return
    failures = {}
    for name in mg.prompt_sets:
        rows = read_shards(Path("artifacts/samples") / key / name, columns=["prompt_id", "image_index", "status"])
        failures[name] = report_failures(log, rows.to_dict("records"), prompt_image_id, SAMPLE_RETRIED,
                                         where=f"sample@{key} {name}", remedies=SAMPLE_REMEDIES, unit="images",
                                         id_name="prompt/image")
        metrics[f"{name}_images"], metrics[f"{name}_failed"] = len(rows), failures[name].failed
    write_json(f"metrics/sample/{key}.json", metrics)
    for name in mg.prompt_sets:
        check_failure_rate(failures[name].counts, metrics[f"{name}_images"], mg.max_failed_rate,
                           f"{key}/{name} images", "multigen.max_failed_rate",
                           f"see the `error` column of artifacts/samples/{key}/{name}", retried=SAMPLE_RETRIED,
                           remedies=SAMPLE_REMEDIES)


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "MODEL", "a key of eval_models in params.yaml"))
