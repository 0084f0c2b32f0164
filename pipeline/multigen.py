"""MultiGen: prompt files, OWLv2 detection and the MG1-MG5 scores (SPEC §3).

* Prompts: the official file format (SPEC §3.1), a JSON list of ``{"unique_id", "num_objects",
  "obj_1_attributes": [name], ..., "text"}``; :func:`load_prompt_set` validates it.
* Detection (SPEC §3.3): OWLv2 with the queries ``"a photo of a {name}"`` for the prompt's objects, one
  query list per image, batched. Every predicted box is kept with its score (sigmoid of its best query
  logit) and label (that query), unlike the original script, whose post-processing dropped every box
  scoring <= 0.1 before its own 0.01 "save threshold" [QUIRK]; so MG can be rescored at any threshold
  without detecting again.
* Scoring (SPEC §3.4): an image finds object ``q`` when some box labelled ``q`` scores > threshold
  (strict); ``n`` = distinct objects found; ``MG_k`` = 100 x share of images with ``n >= k``; its std is the
  population std (ddof = 0) over image index ``j`` of the per-index success rates.

This module imports torch only inside the detection functions, so scoring stays light.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Sequence

import numpy as np
import pandas as pd

from pipeline.config import (
    DtypeName, Fraction, FractionBelowOne, InputDataError, MissingInputError, NonEmpty, PositiveInt,
)
from pipeline.store.shards import STATUS_OK

log = logging.getLogger(__name__)

MG_LEVELS = (1, 2, 3, 4, 5)
STATUS_NO_IMAGE = "no_image"  # the sample row has no image (its sampling failed)
STATUS_CORRUPT_IMAGE = "corrupt_image"  # the sample row's image bytes do not decode
STATUS_DETECT_FAILED = "detect_failed"


@dataclass(frozen=True)
class MultiGenCfg:
    """Top-level ``multigen`` params: method settings shared by every profile (SPEC §3.3-3.4)."""

    threshold: FractionBelowOne = 0.1         # found: a box scores > this
    query_template: str = "a photo of a {name}"
    prompt_sets: Annotated[tuple[str, ...], NonEmpty()] = ("coco", "ade20k")
    prompts_dir: Path = Path("artifacts/data/multigen")
    max_failed_rate: Fraction = 0.01        # a stage fails when more images than this failed

    def __post_init__(self) -> None:
        import string

        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.query_template) if f is not None]
        except ValueError:  # unbalanced braces
            fields = []
        if fields != ["name"]:
            raise ValueError(f"query_template {self.query_template!r} must hold the object name once as {{name}} "
                             f"(e.g. 'a photo of a {{name}}')")


@dataclass(frozen=True)
class MultiGenScale:
    """``profiles.<p>.multigen``: the detector reference and how detection is run."""

    detector: str                           # google/owlv2-large-patch14-ensemble | embedded:tiny-owlv2
    batch_size: PositiveInt                 # images per detector call
    dtype: DtypeName = "float32"            # float32: as the original
    shard_size: PositiveInt = 1             # sample shards per detection shard
    image_backend: Literal["pil", "torchvision"] = "pil"  # pil: the original's resizing; torchvision: faster


# --- prompts ----------------------------------------------------------------------------------------

def queries_for(objects: Sequence[str], template: str) -> list[str]:
    """The detector queries of one image: ``template`` filled with each object name, in prompt order."""
    return [template.format(name=name) for name in objects]


# --- scoring -----------------------------------------------------------------------------------------

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


def above_threshold(scores: Sequence[float], threshold: float) -> np.ndarray:
    """(N,) bool: ``score > threshold`` compared in float32, as the detectors' own post-processing compares
    its float32 scores with a Python threshold (a score of exactly float32(0.1) is not above 0.1)."""
    return np.asarray(scores, dtype=np.float32).reshape(-1) > np.float32(threshold)


def found_names(objects: Sequence[str], per_query_max: Sequence[float], threshold: float) -> set[str]:
    """The prompt objects that have a box labelled with them scoring > ``threshold`` (the MG_k rule)."""
    if len(objects) != len(per_query_max):
        raise ValueError(f"{len(objects)} objects but {len(per_query_max)} query scores")
    return {name for name, hit in zip(objects, above_threshold(per_query_max, threshold)) if hit}


def objects_found(objects: Sequence[str], per_query_max: Sequence[float], threshold: float) -> int:
    """``n``: how many distinct prompt objects have a box labelled with them scoring > ``threshold``."""
    return len(found_names(objects, per_query_max, threshold))


def mg_scores(found: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """MG_k and its std over image index from a (P, J) grid of per-image object counts.

    Args:
        found: (P, J) int, ``found[p, j]`` = objects found in image ``j`` of prompt ``p``.
        valid: (P, J) bool, images that exist and were scored (default: all). Invalid images are left out
            of every denominator, as the original divides by the number of result entries.
    Returns:
        ``{"mg1": ..., "mg1_std": ..., ..., "mg5_std": ...}`` in percent. ``mgK`` = 100 x (valid images
        with n >= K) / (valid images); ``mgK_std`` = population std (ddof=0) over j of the per-index rates
        ``100 x (valid images at j with n >= K) / (valid images at j)`` (indices with none are skipped).
    """
    found = np.asarray(found)
    valid = np.ones(found.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if found.ndim != 2 or found.shape != valid.shape:
        raise ValueError(f"found {found.shape} and valid {valid.shape} must be the same (P, J) shape")
    out: dict[str, float] = {}
    per_index = valid.sum(axis=0)
    for k in MG_LEVELS:
        hit = (found >= k) & valid
        total = valid.sum()
        out[f"mg{k}"] = float(100.0 * hit.sum() / total) if total else float("nan")
        has = per_index > 0
        rates = 100.0 * hit.sum(axis=0)[has] / per_index[has]
        out[f"mg{k}_std"] = float(np.std(rates)) if rates.size else float("nan")
    return out


def score_records(records: Iterable[dict[str, Any]], threshold: float, num_prompts: int,
                  images_per_prompt: int) -> dict[str, float]:
    """MG scores and counts of one prompt set from detection rows.

    Args:
        records: rows with ``prompt_id``, ``image_index``, ``objects``, ``label_max_scores``, ``status``.
        threshold: strict score threshold (0.1 in the original).
        num_prompts, images_per_prompt: the expected (P, J) grid; keys outside it are an error.
    Returns:
        ``mg1..mg5``, ``mg1_std..mg5_std``, ``images_expected``, ``images_scored``, ``images_failed``,
        ``images_missing``.
    """
    shape = (num_prompts, images_per_prompt)
    found = np.zeros(shape, dtype=np.int64)
    valid = np.zeros(shape, dtype=bool)
    seen = np.zeros(shape, dtype=bool)
    for rec in records:
        p, j = int(rec["prompt_id"]), int(rec["image_index"])
        if not (0 <= p < num_prompts and 0 <= j < images_per_prompt):
            raise InputDataError(f"detection row prompt {p} image {j} lies outside the expected {shape} grid; "
                                 f"the detections were made with other sampling params; rerun `dvc repro`")
        seen[p, j] = True
        if rec["status"] == STATUS_OK:
            found[p, j] = objects_found(rec["objects"], rec["label_max_scores"], threshold)
            valid[p, j] = True
    scores = mg_scores(found, valid)
    scores.update(images_expected=int(found.size), images_scored=int(valid.sum()),
                  images_failed=int((seen & ~valid).sum()), images_missing=int((~seen).sum()))
    return scores


def category_counts(records: Iterable[dict[str, Any]], threshold: float) -> pd.DataFrame:
    """How often each category is found in the scored images whose prompt names it.

    Args:
        records: detection rows with ``objects``, ``label_max_scores`` and ``status`` (only ``ok`` rows count).
        threshold: strict score threshold, as for MG_k (:func:`found_names`).
    Returns:
        One row per category, sorted by name: ``category``, ``images`` (scored images whose prompt names it),
        ``found`` (those in which a box labelled with it scores above the threshold), ``rate`` (100 x
        found / images, in percent).
    """
    images: dict[str, int] = {}
    found: dict[str, int] = {}
    for rec in records:
        if rec["status"] != STATUS_OK:
            continue
        hits = found_names(rec["objects"], rec["label_max_scores"], threshold)
        for name in dict.fromkeys(rec["objects"]):
            images[name] = images.get(name, 0) + 1
            found[name] = found.get(name, 0) + (name in hits)
    names = sorted(images)
    counts = pd.DataFrame({"category": names, "images": [images[n] for n in names],
                           "found": [found[n] for n in names]}, columns=["category", "images", "found"])
    counts = counts.astype({"category": str, "images": "int64", "found": "int64"})
    counts["rate"] = 100.0 * counts["found"] / counts["images"] if len(counts) else pd.Series(dtype=float)
    return counts


def format_row(scores: dict[str, float], levels: Sequence[int] = MG_LEVELS) -> str:
    """The original table cells ``"{mean:.2f}({std:.2f})"`` for MG levels ``levels``."""
    return " ".join(f"{scores[f'mg{k}']:.2f}({scores[f'mg{k}_std']:.2f})" for k in levels)


# --- detection -----------------------------------------------------------------------------------------

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
    for start in range(0, len(decoded), batch_size):
        results.update(_detect_batch_rows(detector, decoded[start : start + batch_size]))
    rows = [{"prompt_id": s["prompt_id"], "image_index": s["image_index"], "objects": list(s["objects"]),
             "queries": queries_for(s["objects"], template), **results[(s["prompt_id"], s["image_index"])]}
            for s in samples]
    if not keep_centers:
        for row in rows:
            del row["box_centers"]
    return rows


def _detect_batch_rows(detector: Detector, batch: list[tuple[tuple[int, int], Any, list[str]]]
                       ) -> dict[tuple[int, int], dict[str, Any]]:
    """Detection results of ``(key, image, queries)`` items, keyed by (prompt id, image index); a batch
    that raises is retried one image at a time, and only the images that fail alone are ``detect_failed``."""
    try:
        dets = detect_batch(detector, [image for _, image, _ in batch], [q for _, _, q in batch])
        return {key: dict(d, status=STATUS_OK, error="") for (key, _, _), d in zip(batch, dets)}
    except Exception as err:  # noqa: BLE001 - recorded per row, counted and checked by the stage
        if len(batch) > 1:
            log.warning("detection of prompts %s failed (%s); retrying image by image",
                        sorted({key[0] for key, _, _ in batch}), err)
            return {k: v for one in batch for k, v in _detect_batch_rows(detector, [one]).items()}
        log.exception("detection failed for prompt %s image %s", *batch[0][0])
        return {batch[0][0]: _failed_row(STATUS_DETECT_FAILED, f"{type(err).__name__}: {err}")}


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
