"""Stage `fid@<model>`: FID and CLIP score of a model's FID images, per reference set (docs/fid.md).

Usage: ``python -m stages.fid MODEL`` (a key of ``eval_models`` or ``step_<N>``).
FID: the model's images (artifacts/fid_samples/<MODEL>/<set>/) through the extractor that made the reference
statistics (artifacts/fid/reference/, never recomputed here). CLIP score: ``max(100 · cos, 0)`` of each
image against its caption with ``profiles.<p>.fid.clip_model`` (OpenAI ViT-L/14 in the paper profile), mean
and std over images. Outs: metrics/fid/<MODEL>.json (per set: fid, clip_score, clip_score_std, images,
real_images; the extractor, CLIP model and the sampler settings that made the images) and
plots/clip_score/<MODEL>.csv (reference, prompt_id, clip_score of each caption: stage compare's input).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from pipeline.clip_score import ClipSimilarity
from pipeline.config import MissingInputError, load_params, profile_fields, section
from pipeline.paths import MODELS_DIR
from pipeline.photorealism.features import open_extractor
from pipeline.photorealism.scoring import REFERENCE_DIR, reference_stats, score_images
from pipeline.photorealism.settings import FID_SAMPLES_DIR, EmbeddedSeed, FidScale
from pipeline.runtime import rank_device, run_stage, stage_argument, write_json

log = logging.getLogger("stages.fid")
CLIP_DIR = Path("plots/clip_score")  # per-caption CLIP scores, resampled by stage compare


def main(key: str) -> None:
    params = load_params()
    scale = section(params, "profile.fid", FidScale)
    device = rank_device()
    extractor, identity = open_extractor(scale.extractor, REFERENCE_DIR / "extractor", scale.inception_weights,
                                         profile_fields(params, EmbeddedSeed).embedded_seed,
                                         batch_size=scale.batch_size, device=device)
    clip = ClipSimilarity.load(scale.clip_model, MODELS_DIR, device)
    sampler_file = FID_SAMPLES_DIR / key / "sampler.json"
    if not sampler_file.is_file():
        raise MissingInputError(f"{sampler_file}: not found; run `dvc repro fid_sample@{key}`")
    metrics = {"extractor": identity["name"], "extractor_weights_sha256": identity["weights_sha256"],
               "clip_model": scale.clip_model, "sampler": json.loads(sampler_file.read_text())}
    per_caption = []
    for name in scale.references:
        metrics[name], scores = score_images(FID_SAMPLES_DIR / key / name, reference_stats(name, identity),
                                             extractor, clip, scale.batch_size)
        per_caption.append(scores.assign(reference=name)[["reference", "prompt_id", "clip_score"]])
        log.info("fid@%s %s: FID %.2f, CLIP score %.2f over %d images", key, name, metrics[name]["fid"],
                 metrics[name]["clip_score"], metrics[name]["images"])
    CLIP_DIR.mkdir(parents=True, exist_ok=True)
    pd.concat(per_caption).to_csv(CLIP_DIR / f"{key}.csv", index=False, float_format="%.6g")
    write_json(f"metrics/fid/{key}.json", metrics)


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "MODEL", "a key of eval_models in params.yaml, or step_<N>"))
