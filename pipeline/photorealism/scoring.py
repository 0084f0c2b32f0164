"""FID and CLIP score of one model's images of one reference set (stage ``fid@<model>``, docs/fid.md).

The reference statistics come from ``fid_reference`` (``artifacts/fid/reference/<set>.npz``) and are only
read here: :func:`reference_stats` refuses them when they were computed with another extractor than the
one loaded now (a different weights file), since the two feature spaces would not be comparable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.clip_score import ClipSimilarity
from pipeline.config import MissingInputError, StageError
from pipeline.photorealism.features import FeatureExtractor
from pipeline.photorealism.fid import FeatureStats, fid_of
from pipeline.store.codecs import image_from_bytes
from pipeline.store.shards import STATUS_OK, iter_rows, read_shards

REFERENCE_DIR = Path("artifacts/fid/reference")
REFERENCE_RECORD = "reference.json"


class ReferenceMismatchError(StageError, ValueError):
    """The reference statistics were computed with another feature extractor than the one loaded."""


def reference_record(ref_dir: Path = REFERENCE_DIR) -> dict[str, Any]:
    """``reference.json`` of ``fid_reference``: the extractor identity, the image size, the sets' counts."""
    path = ref_dir / REFERENCE_RECORD
    if not path.is_file():
        raise MissingInputError(f"{path}: reference statistics not found; run `dvc repro fid_reference`")
    return json.loads(path.read_text())


def reference_stats(name: str, identity: dict[str, Any], ref_dir: Path = REFERENCE_DIR) -> FeatureStats:
    """The saved statistics of reference set ``name``, after checking they came from extractor ``identity``."""
    record = reference_record(ref_dir)
    if record["extractor"] != identity:
        raise ReferenceMismatchError(
            f"{ref_dir}: reference statistics were computed with {record['extractor']}, but the extractor loaded "
            f"now is {identity}; run `dvc repro fid_reference` so both sides use the same network")
    if name not in record["sets"]:
        raise MissingInputError(f"{ref_dir}: no statistics of reference set {name!r} (has "
                                f"{sorted(record['sets'])}); run `dvc repro fid_reference`")
    return FeatureStats.load(ref_dir / f"{name}.npz")


def generated_batches(samples_dir: Path, batch_size: int) -> Iterator[tuple[np.ndarray, list[str], list[int]]]:
    """(uint8 (B, H, W, 3) images, their B prompts, their B prompt ids) of the usable images of a sample shard
    folder, in shard order."""
    images: list[np.ndarray] = []
    prompts: list[str] = []
    ids: list[int] = []
    for row in iter_rows(samples_dir, columns=["prompt_id", "image", "prompt", "status"]):
        if row["status"] != STATUS_OK:
            continue
        images.append(np.asarray(image_from_bytes(row["image"]), dtype=np.uint8))
        prompts.append(str(row["prompt"]))
        ids.append(int(row["prompt_id"]))
        if len(images) == batch_size:
            yield np.stack(images), prompts, ids
            images, prompts, ids = [], [], []
    if images:
        yield np.stack(images), prompts, ids


def score_images(samples_dir: Path, reference: FeatureStats, extractor: FeatureExtractor, clip: ClipSimilarity,
                 batch_size: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """FID against ``reference`` and CLIP score (mean, std over images) of the images in ``samples_dir``, and
    the CLIP score of each caption (``prompt_id``, ``clip_score``; NaN where its image failed) for the paired
    comparisons of stage ``compare``.

    Features and CLIP scores are streamed batch by batch; a FID needs at least 2 images.
    """
    stats = FeatureStats(extractor.dim)
    scored: dict[int, float] = {}
    batches = generated_batches(samples_dir, batch_size)
    for images, prompts, ids in tqdm(batches, desc=f"fid {samples_dir.name}", unit="batch"):
        stats.update(extractor(images))
        scored.update(zip(ids, clip.scores(list(images), prompts)))
    if stats.count < 2:
        raise StageError(f"{samples_dir}: {stats.count} usable images; a FID needs at least 2 "
                         f"(see the `status`/`error` columns of its shards)")
    scores = np.fromiter(scored.values(), dtype=np.float64)
    every = sorted(int(i) for i in read_shards(samples_dir, columns=["prompt_id"])["prompt_id"])
    per_caption = pd.DataFrame({"prompt_id": every, "clip_score": [scored.get(i, np.nan) for i in every]})
    summary = {"fid": fid_of(stats, reference), "clip_score": float(scores.mean()),
               "clip_score_std": float(scores.std(ddof=1)), "images": stats.count, "real_images": reference.count}
    return summary, per_caption
