"""The ``masks`` stage's Grounded-SAM source (SPEC §2.4-2.8): every nouns row with its image -> mask rows.

For each caption of ``artifacts/nouns/`` and its image in ``artifacts/data/images/`` (:class:`ImageStore`),
:class:`pipeline.masks.jobs.Grounder` prompts Grounding DINO with the phrases, matches box labels to
phrases, segments the matched boxes with SAM and writes one row per (image, phrase): the union mask as COCO
RLE at the original size, ``train_mask`` after the training image transform, the enclosing box, the best box
score, a ``status`` and an ``error``. Bad input never crashes the stage and never vanishes. Work is written
in resumable shards (:func:`pipeline.store.shards.write_shards`) and split by rank under ``accelerate launch``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from PIL import Image

from pipeline.masks.inputs import RunContext, read_nouns
from pipeline.masks.jobs import Grounder, make_job
from pipeline.masks.models import GroundingDetector, load_segmenter
from pipeline.masks.params import GroundingCfg, MasksScale
from pipeline.models import inference_dtype, parse_ref, resolve
from pipeline.store import shards
from pipeline.store.codecs import image_from_bytes
from pipeline.store.identity import code_digest, dir_files, files_digest
from pipeline.store.shards import STATUS_OK, write_shards

log = logging.getLogger(__name__)


class ImageStore:
    """Random access to ``artifacts/data/images`` rows by ``image_id`` (reads only the shards it needs)."""

    def __init__(self, images_dir: Path):
        self.files: dict[str, Path] = {}
        for path in shards.shard_files(Path(images_dir)):
            for image_id in shards.read_table(path, columns=["image_id"]).column("image_id").to_pylist():
                if str(image_id) in self.files:
                    log.warning("%s: duplicate image_id %s; using the first", images_dir, image_id)
                    continue
                self.files[str(image_id)] = path

    def load(self, image_ids: Iterable[str]) -> dict[str, tuple[Image.Image | None, str, str]]:
        """``{image_id: (RGB image or None, status, error)}`` with status ok / missing_image / corrupt_image."""
        ids = [str(i) for i in dict.fromkeys(image_ids)]
        out = {i: (None, "missing_image", f"image {i}: not in artifacts/data/images; rerun train_data")
               for i in ids if i not in self.files}
        by_file: dict[Path, list[str]] = {}
        for i in ids:
            if i in self.files:
                by_file.setdefault(self.files[i], []).append(i)
        for path, wanted in by_file.items():
            table = shards.read_table(path, columns=["image_id", "image", "status", "error"],
                                      filters=[("image_id", "in", wanted)])
            for row in table.to_pylist():
                out.setdefault(str(row["image_id"]), _decode_image_row(row))
        return out


def _decode_image_row(row: dict[str, Any]) -> tuple[Image.Image | None, str, str]:
    """(RGB image or None, status, error) of one ``artifacts/data/images`` row."""
    image_id = row["image_id"]
    if row.get("status", STATUS_OK) != STATUS_OK or not row.get("image"):
        return None, "missing_image", f"image {image_id}: images row has status {row.get('status')!r} ({row.get('error')})"
    try:
        return image_from_bytes(row["image"]), STATUS_OK, ""
    except Exception as err:  # noqa: BLE001 - PIL raises several types for bad bytes
        return None, "corrupt_image", f"image {image_id}: bytes do not decode ({type(err).__name__}: {err})"


def model_digest(ref: str, models_dir: str | Path) -> str:
    """Identity of a model reference's weights: file digest for local/embedded models, the id for hub ones."""
    if ref.endswith(".pth") or parse_ref(ref).kind != "hub":
        target = Path(ref) if ref.endswith(".pth") else Path(resolve(ref, models_dir))
        return files_digest(dir_files(target))
    return ref


def write_grounded_masks(ctx: RunContext, cfg: GroundingCfg, scale: MasksScale) -> list[Path]:
    """Run Grounded-SAM over every nouns row into ``ctx.out_dir`` (resumable; this rank's shards)."""
    items = read_nouns(ctx.nouns_dir)
    dtype = inference_dtype(scale.dtype, ctx.device)
    fingerprint = {
        "source": "grounded_sam", "box_threshold": cfg.box_threshold, "text_threshold": cfg.text_threshold,
        "detector": scale.detector, "segmenter": scale.segmenter, "batch_size": scale.batch_size,
        "resolution": ctx.resolution, "device": ctx.device.type, "dtype": str(dtype),
        "cpu_threads": torch.get_num_threads() if ctx.device.type == "cpu" else None,  # float sums depend on it
        "detector_files": model_digest(scale.detector, ctx.models_dir),
        "segmenter_files": model_digest(scale.segmenter, ctx.models_dir),
        "inputs": files_digest(shards.shard_files(ctx.nouns_dir) + shards.shard_files(ctx.images_dir)),
    }
    code = code_digest(__name__)
    redo = ("inference_failed",)

    @functools.cache
    def grounder() -> Grounder:
        """Grounding DINO and SAM, loaded on the first call."""
        return Grounder(GroundingDetector.load(scale.detector, ctx.models_dir, ctx.device, dtype),
                        load_segmenter(scale.segmenter, ctx.models_dir, ctx.device, dtype),
                        cfg.box_threshold, cfg.text_threshold, scale.batch_size, ctx.resolution)

    # Models load before stale shards are dropped: a reference that does not load loses no finished work.
    # They are not loaded at all when every shard of this rank is written (a rerun for the summary only).
    if shards.pending_shards(ctx.out_dir, items, scale.shard_size, fingerprint, code=code, rank=ctx.rank,
                             world_size=ctx.world_size, redo_statuses=redo):
        grounder()
    else:
        log.info("%s: every shard of this process is written; Grounding DINO and SAM are not loaded", ctx.out_dir)
    shards.prepare_for_ranks(ctx.out_dir, len(items), scale.shard_size, fingerprint, ctx.rank, ctx.barrier, code)
    store = ImageStore(ctx.images_dir)

    def process(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows of one shard's nouns rows."""
        images = store.load(str(item["image_id"]) for item in chunk)
        return grounder().run([make_job(item, *images[str(item["image_id"])]) for item in chunk])

    return write_shards(ctx.out_dir, items, process, scale.shard_size, fingerprint, ctx.rank, ctx.world_size,
                        code=code, desc="masks", redo_statuses=redo)
