"""Stage `fid_sample@<model>`: one image per FID caption of every reference set (docs/fid.md).

Usage: ``python -m stages.fid_sample MODEL`` (a key of ``eval_models`` or ``step_<N>``); multi-GPU:
``accelerate launch -m stages.fid_sample MODEL``. The MultiGen sampler and settings (``sampling``,
``profiles.<p>.sampling``: steps, guidance, dtype, batch and shard sizes); Attend-and-Excite's token indices
come from the noun tagger (``text``, ``profiles.<p>.text``: pipeline.photorealism.sampling).
Deps: artifacts/data/fid/captions, the model's weights. Outs: artifacts/fid_samples/<MODEL>/<set>/ (Parquet
shards, persist: resumes after a kill) and artifacts/fid_samples/<MODEL>/sampler.json (what made them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.eval_models import eval_model
from pipeline.failures import prompt_image_id, report_failures
from pipeline.models import component_hashes
from pipeline.paths import MODELS_DIR
from pipeline.photorealism.captions import read_captions
from pipeline.photorealism.sampling import caption_items, caption_sampler, caption_token_indices, sample_captions
from pipeline.photorealism.settings import FID_SAMPLES_DIR, FidCfg, FidScale
from pipeline.runtime import (check_failure_rate, dist_info, rank_device, run_stage, stage_argument,
                              wait_for_everyone)
from pipeline.sampling.remedies import SAMPLE_REMEDIES, SAMPLE_RETRIED
from pipeline.sampling.sampler import open_sampler, sampler_record
from pipeline.sampling.settings import SamplingCfg, SamplingScale
from pipeline.store.shards import read_shards
from pipeline.text import tagger as tagging
from pipeline.text.nouns_rows import TextCfg, TextScale

log = logging.getLogger("stages.fid_sample")


def noun_tagger(params: dict):
    """The project's noun tagger (``text`` params), which gives Attend-and-Excite its token indices."""
    cfg, scale = section(params, "text", TextCfg), section(params, "profile.text", TextScale)
    return tagging.load_tagger(scale.tagger, tagging.DEFAULT_NLTK_DATA, tagging.DEFAULT_CORPUS_DIR,
                               params["seed"], cfg.tagger_iterations, scale.tagger_sha256)


def main(key: str) -> None:
    params = load_params()
    cfg, scale = section(params, "sampling", SamplingCfg), section(params, "profile.sampling", SamplingScale)
    fid, fid_scale = section(params, "fid", FidCfg), section(params, "profile.fid", FidScale)
    model, ref = eval_model(params, key)
    dist = dist_info()
    sampler = caption_sampler(open_sampler(ref, model, MODELS_DIR, cfg, scale, int(params["seed"]), rank_device()))
    weights = component_hashes(sampler.pipe)
    out = FID_SAMPLES_DIR / key
    tagger = noun_tagger(params) if model.sampler == "attend_excite" else None  # loaded once for every set
    max_index = section(params, "text", TextCfg).max_token_index
    for name in fid_scale.references:
        captions = read_captions(name)
        tokens = None if tagger is None else [
            caption_token_indices(tagger, sampler.pipe.tokenizer, c["text"], max_index) for c in captions]
        sample_captions(sampler, name, caption_items(name, captions, tokens), out / name, weights, dist.rank,
                        dist.world_size)
    wait_for_everyone()
    if not dist.is_main:
        return
    record = {**sampler_record(sampler, ref), "seed": sampler.seed, "sets": {}}
    for name in fid_scale.references:
        rows = read_shards(out / name, columns=["prompt_id", "image_index", "status"])
        failures = report_failures(log, rows.to_dict("records"), prompt_image_id, SAMPLE_RETRIED,
                                   where=f"fid_sample@{key} {name}", remedies=SAMPLE_REMEDIES, unit="images",
                                   id_name="caption/image")
        record["sets"][name] = {"images": len(rows), "failed": failures.failed}
        check_failure_rate(failures.counts, len(rows), fid.max_failed_rate, f"fid_sample@{key} {name} images",
                           "fid.max_failed_rate", f"see the `error` column of {out / name}",
                           retried=SAMPLE_RETRIED, remedies=SAMPLE_REMEDIES)
    Path(out / "sampler.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "MODEL", "a key of eval_models in params.yaml, or step_<N>"))
