"""MultiGen detection (SPEC §3.3): OWLv2 with the queries ``"a photo of a {name}"`` for the prompt's objects,
one query list per image, batched. Every predicted box is kept with its score (sigmoid of its best query
logit) and label (that query), unlike the original script, whose post-processing dropped every box
scoring <= 0.1 before its own 0.01 "save threshold" [QUIRK]; so MG can be rescored at any threshold
without detecting again."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.config import DtypeName, MissingInputError
from pipeline.multigen.settings import MultiGenScale
from pipeline.store.batches import error_text, run_batches
from pipeline.store.shards import STATUS_OK

log = logging.getLogger(__name__)

STATUS_NO_IMAGE = "no_image"  # the sample row has no image (its sampling failed)


STATUS_CORRUPT_IMAGE = "corrupt_image"  # the sample row's image bytes do not decode


STATUS_DETECT_FAILED = "detect_failed"


def queries_for(objects: Sequence[str], template: str) -> list[str]:
    """The detector queries of one image: ``template`` filled with each object name, in prompt order."""
    return [template.format(name=name) for name in objects]


def label_max_scores(box_scores: Sequence[float], box_labels: Sequence[int], num_queries: int) -> list[float]:
    """Per query ``q``: the highest score of the boxes labelled ``q`` (0.0 when no box has that label).

    Args:
        box_scores: (B,) score of each box (sigmoid of its best query logit).
        box_labels: (B,) index of that best query.
        num_queries: Q, the number of queries of the image.
    Returns:
        (Q,) list; ``label_max_scores(...)[q] > t`` iff a box labelled ``q`` scores above ``t``.
    """
    best = np.zeros(num_queries, dtype=np.float64)
    scores = np.asarray(box_scores, dtype=np.float64)
    labels = np.asarray(box_labels, dtype=np.int64)
    if scores.shape != labels.shape:
        raise ValueError(f"box_scores {scores.shape} and box_labels {labels.shape} differ in length")
    if labels.size and (labels.min() < 0 or labels.max() >= num_queries):
        raise ValueError(f"box labels must lie in [0, {num_queries}), got {labels.min()}..{labels.max()}")
    np.maximum.at(best, labels, scores)
    return best.tolist()


@dataclass
class Detector:
    """An OWL detector and its processor on one device: OWLv2 (MultiGen) or OWL-ViT (VISOR)."""

    model: Any
    processor: Any
    device: Any
    dtype: Any


OWL_MODEL_TYPES = ("owlv2", "owlvit")  # the detectors whose outputs :func:`detect_batch` reads


def load_detector(ref: str, models_dir: str | Path, device: Any, dtype: DtypeName = "float32",
                  image_backend: str = "pil") -> Detector:
    """Load the OWLv2 or OWL-ViT detector ``ref`` (hub id, local folder or ``embedded:NAME``) in eval mode.

    ``image_backend`` picks the image processor's implementation. ``pil`` is the algorithm the original
    evaluations ran: OWLv2's scipy resize with anti-aliasing (skimage's), and OWL-ViT's PIL bicubic resize.
    ``torchvision`` approximates it faster (how far and how much faster: ``bench/detector_preprocess.py``).
    """
    import torch
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    from pipeline.models import ModelLoadError, from_pretrained, inference_dtype

    torch_dtype = inference_dtype(dtype, device)
    model = from_pretrained(AutoModelForZeroShotObjectDetection, ref, models_dir, dtype=torch_dtype)
    if model.config.model_type not in OWL_MODEL_TYPES:
        raise ModelLoadError(f"{ref!r} is a {model.config.model_type!r} model; the detector must be OWLv2 or "
                             f"OWL-ViT (e.g. google/owlv2-large-patch14-ensemble, google/owlvit-base-patch32)")
    processor = from_pretrained(AutoProcessor, ref, models_dir, backend=image_backend)
    return Detector(model.to(device).eval(), processor, torch.device(device), torch_dtype)


def detector_fingerprint(detector: Detector, scale: MultiGenScale, template: str) -> dict[str, Any]:
    """What a detection row depends on besides its image: the detector, its weights, dtype, image
    processing and queries (batch and shard sizes excluded)."""
    from pipeline.store.identity import state_dict_hash

    return {"detector": scale.detector, "weights": state_dict_hash(detector.model), "dtype": str(detector.dtype),
            "image_backend": scale.image_backend, "template": template}


def detect_batch(detector: Detector, images: Sequence[Any], queries: Sequence[Sequence[str]]) -> list[dict]:
    """Run OWLv2 on a batch of images, each with its own query list; keep every predicted box.

    Args:
        images: B PIL images (any size; OWLv2's processor pads to square and resizes, OWL-ViT's resizes).
        queries: B lists of Q query strings.
    Returns:
        B dicts with ``box_scores`` (N,) floats, ``box_labels`` (N,) ints in [0, Q), ``box_centers`` (N, 2)
        box centres (x, y) as fractions of the detector's square input, and ``label_max_scores`` (Q,);
        N = the detector's number of boxes (5,184 = 72² for OWLv2-large: 1008 px, patch 14).
    """
    import torch

    inputs = dict(detector.processor(text=[list(q) for q in queries], return_tensors="pt"))
    inputs["pixel_values"] = pixel_values(detector.processor.image_processor, images)
    inputs = {k: v.to(detector.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(detector.dtype)
    with torch.no_grad():
        outputs = detector.model(**inputs)
    outputs.logits = outputs.logits.float()
    outputs.pred_boxes = outputs.pred_boxes.float()
    # The library's own post-processing: score = sigmoid(max logit over queries), label = arg-max query.
    results = detector.processor.image_processor.post_process_object_detection(outputs, threshold=-1.0)
    rows = []
    for res, q in zip(results, queries):
        scores, labels = res["scores"].cpu().tolist(), res["labels"].cpu().tolist()
        boxes = res["boxes"].cpu()  # (N, 4) x0, y0, x1, y1
        centers = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)
        rows.append({"box_scores": scores, "box_labels": labels, "box_centers": centers.tolist(),
                     "label_max_scores": label_max_scores(scores, labels, len(q))})
    return rows


PREPROCESS_THREADS = min(8, os.cpu_count() or 1)  # image resizes run in scipy / PIL, which release the GIL


def pixel_values(process: Any, images: Sequence[Any]) -> Any:
    """(B, 3, S, S) float32 detector input of B PIL images, resized and normalised by the image processor
    ``process``, one image per thread (the same tensor as one batched call, several times faster with
    ``image_backend: pil``)."""
    import torch

    with ThreadPoolExecutor(max_workers=max(1, min(len(images), PREPROCESS_THREADS))) as pool:
        parts = list(pool.map(lambda image: process(images=[image], return_tensors="pt")["pixel_values"], images))
    return torch.cat(parts)


def _failed_row(status: str, error: str) -> dict[str, Any]:
    """A detection row for an image that could not be scored (kept, never dropped)."""
    return {"box_scores": [], "box_labels": [], "box_centers": [], "label_max_scores": [], "status": status,
            "error": error}


def detect_rows(detector: Detector, samples: list[dict[str, Any]], template: str, batch_size: int,
                keep_centers: bool = False) -> list[dict]:
    """Detection rows for sample rows (``prompt_id``, ``image_index``, ``objects``, ``image``, ``status``).

    Every sample gives one row, in order. Images whose sampling failed become ``no_image`` rows, images
    that do not decode ``corrupt_image`` rows, and images whose detection raises even when retried alone
    ``detect_failed`` rows (a batch that raises is retried image by image, so one bad image fails only
    itself; a rerun of the stage tries ``detect_failed`` images again). Output columns:
    ``prompt_id``, ``image_index``, ``objects``, ``queries``, ``box_scores``, ``box_labels``,
    ``label_max_scores``, ``status``, ``error``, and ``box_centers`` with ``keep_centers`` (VISOR needs
    them; MultiGen does not, and they would double the size of its shards).
    """
    from pipeline.store.codecs import image_from_bytes

    results: dict[tuple[int, int], dict[str, Any]] = {}
    decoded: list[tuple[tuple[int, int], Any, list[str]]] = []
    for s in samples:
        key = (s["prompt_id"], s["image_index"])
        if s["status"] != STATUS_OK:
            results[key] = _failed_row(STATUS_NO_IMAGE, f"sampling {s['status']}: {s['error']}")
            continue
        try:
            decoded.append((key, image_from_bytes(s["image"]), queries_for(s["objects"], template)))
        except Exception as err:  # noqa: BLE001 - PIL raises several types for bad bytes; recorded per row
            log.error("prompt %s image %s: image does not decode (%s)", *key, err)
            results[key] = _failed_row(STATUS_CORRUPT_IMAGE, f"image does not decode: {err}")
    detected = run_batches(decoded, batch_size, lambda batch: _detect_batch_rows(detector, batch),
                           lambda one, err: _failed_row(STATUS_DETECT_FAILED, error_text(err)),
                           lambda one: f"detection of prompt {one[0][0]} image {one[0][1]}")
    results.update({key: row for (key, _, _), row in zip(decoded, detected)})
    rows = [{"prompt_id": s["prompt_id"], "image_index": s["image_index"], "objects": list(s["objects"]),
             "queries": queries_for(s["objects"], template), **results[(s["prompt_id"], s["image_index"])]}
            for s in samples]
    if not keep_centers:
        for row in rows:
            del row["box_centers"]
    return rows


def _detect_batch_rows(detector: Detector, batch: list[tuple[tuple[int, int], Any, list[str]]]
                       ) -> list[dict[str, Any]]:
    """Detection results of a batch of ``(key, image, queries)`` items, one per item, in order."""
    dets = detect_batch(detector, [image for _, image, _ in batch], [q for _, _, q in batch])
    return [dict(d, status=STATUS_OK, error="") for d in dets]


def detect_prompt_set(detector: Detector, sample_dir: Path, out_dir: Path, template: str, scale: MultiGenScale,
                      fingerprint: Any, rank: int = 0, world_size: int = 1, keep_centers: bool = False) -> list[Path]:
    """Detect on every sample shard of ``sample_dir``; write detection shards to ``out_dir`` (resumable).

    Detection shard ``i`` covers sample shards ``[i*S, (i+1)*S)`` (S = ``scale.shard_size``), so only one
    sample shard's images are in memory at a time. Each detection shard records the names and contents of
    its sample shards (:func:`pipeline.shards.items_digest`): only detections of new or changed samples
    are computed again.
    """
    from pipeline.store.identity import code_digest
    from pipeline.store.shards import read_table, shard_files, write_shards

    files = shard_files(sample_dir)
    if not files:
        raise MissingInputError(f"{sample_dir}: no sample shards; run the `sample` stage first")
    full_fp = {"params": fingerprint} | ({"centers": True} if keep_centers else {})

    def process(chunk: list[Path]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for f in chunk:
            rows += detect_rows(detector, read_table(f).to_pylist(), template, scale.batch_size, keep_centers)
        return rows

    return write_shards(out_dir, files, process, scale.shard_size, full_fp, rank, world_size,
                        code=code_digest(__name__), desc=f"detect {Path(sample_dir).name}",
                        redo_statuses=(STATUS_DETECT_FAILED,))
