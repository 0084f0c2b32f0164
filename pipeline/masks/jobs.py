"""Grounded-SAM on captions: jobs (a nouns row with its image), batched inference, one row per phrase.

:class:`Grounder` runs a detector and a segmenter (:mod:`pipeline.masks.models`, or any objects with the
same ``detect`` / ``segment`` methods) over :class:`Job` s in batches; every box whose label matches a
phrase (:func:`pipeline.masks.labels.match_label`) is segmented and the masks of one phrase are unioned
(the original kept the last label's mask only). A batch that raises is retried one image at a time, so only
an image that fails alone gets ``inference_failed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from pipeline.geometry import train_mask
from pipeline.masks.labels import build_prompt, match_label
from pipeline.masks.rows import masks_row, phrase_entries
from pipeline.store.batches import error_text, run_batches
from pipeline.store.codecs import rle_encode
from pipeline.store.shards import STATUS_OK


@dataclass
class Detections:
    """Grounding DINO output for one image: ``boxes`` (N, 4) xyxy pixels, ``scores`` (N,), ``labels``."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]


class Detector(Protocol):
    """What :class:`Grounder` needs of a detector (:class:`pipeline.masks.models.GroundingDetector`)."""

    def detect(self, images: Sequence[Image.Image], prompts: Sequence[str], box_threshold: float,
               text_threshold: float) -> list[Detections]:
        """One :class:`Detections` per image, each with its own prompt."""


class Segmenter(Protocol):
    """What :class:`Grounder` needs of a segmenter (the SAM classes of :mod:`pipeline.masks.models`)."""

    def segment(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Masks for ``boxes[i]`` ((N_i, 4) xyxy pixels) on ``images[i]`` -> (N_i, H_i, W_i) bool each."""


@dataclass
class Job:
    """One nouns row with its image: the phrases to ground and what is already known about them."""

    item: dict[str, Any]
    image: Image.Image | None = None
    status: str = STATUS_OK  # image status: ok, missing_image, corrupt_image
    error: str = ""
    phrases: list[str] = field(default_factory=list)  # unique non-empty phrases in caption order (the prompt)
    usable: list[bool] = field(default_factory=list)  # per unique phrase: some row with it is aligned

    @property
    def needs_inference(self) -> bool:
        """The image is usable and some phrase is aligned: the models have something to do."""
        return self.status == STATUS_OK and any(self.usable)


def make_job(item: dict[str, Any], image: Image.Image | None, status: str, error: str) -> Job:
    """A :class:`Job` for a nouns row; ``status``/``error`` describe its image."""
    job = Job(item, image, status, error)
    for phrase, _, p_status, _ in phrase_entries(item):
        key = phrase.strip().lower()
        if not key:
            continue
        if key not in job.phrases:
            job.phrases.append(key)
            job.usable.append(False)
        job.usable[job.phrases.index(key)] |= p_status == STATUS_OK
    return job


def _skip_summary(labels: list[str], reasons: list[str]) -> str:
    """How many boxes were found and which labels were skipped (the error of a ``no_detection`` row)."""
    skipped = [f"{label!r}: {reason}" for label, reason in zip(labels, reasons) if reason in ("empty_label", "unmatched_label")]
    return f"{len(labels)} boxes above box_threshold" + (f"; skipped {', '.join(skipped[:5])}" if skipped else "")


def rows_for_job(job: Job, detections: Detections | None, masks: dict[int, tuple[np.ndarray, list[int]]],
                 resolution: int, summary: str = "") -> list[dict[str, Any]]:
    """The artifacts/masks rows of one caption.

    ``masks[k]`` = (union mask (H, W) bool, indices of its boxes in ``detections``) for unique phrase ``k``.
    """
    item, entries = job.item, phrase_entries(job.item)
    if job.status != STATUS_OK:
        return [masks_row(item, p, idx, job.status, job.error) for p, idx, _, _ in entries] or [
            masks_row(item, "", [], job.status, job.error)]
    if not entries:
        error = item.get("error") or f"caption {item['image_id']}: no noun phrase"
        return [masks_row(item, "", [], "no_phrases", str(error))]
    rows = []
    for phrase, idx, p_status, p_error in entries:
        key = phrase.strip().lower()
        if not key:
            rows.append(masks_row(item, phrase, idx, "empty_phrase", f"caption {item['image_id']}: empty phrase"))
        elif p_status != STATUS_OK:
            rows.append(masks_row(item, phrase, idx, "not_aligned", p_error or p_status))
        elif job.phrases.index(key) not in masks:
            rows.append(masks_row(item, phrase, idx, "no_detection", f"no box matched {phrase!r} ({summary})"))
        else:
            rows.append(_mask_row(item, phrase, idx, *masks[job.phrases.index(key)], detections, resolution))
    return rows


def _mask_row(item: dict[str, Any], phrase: str, idx: list[int], mask: np.ndarray, boxes: list[int],
              detections: Detections, resolution: int) -> dict[str, Any]:
    """Row with the union ``mask``, its ``train_mask``, enclosing box and best score of boxes ``boxes``."""
    chosen = detections.boxes[boxes]
    box = [float(chosen[:, 0].min()), float(chosen[:, 1].min()), float(chosen[:, 2].max()), float(chosen[:, 3].max())]
    small = train_mask(mask, resolution)
    status, error = STATUS_OK, ""
    if not mask.any():
        status, error = "empty_mask", f"SAM returned no pixel for {phrase!r} ({len(boxes)} boxes)"
    elif not small.any():
        status, error = "outside_crop", f"mask of {phrase!r} lies outside the {resolution}px centre crop"
    return masks_row(item, phrase, idx, status, error, mask=rle_encode(mask), train_mask=rle_encode(small), box=box,
                     score=float(detections.scores[boxes].max()))


def assign_boxes(job: Job, detections: Detections) -> tuple[dict[int, list[int]], list[str]]:
    """Boxes of each usable unique phrase (``{k: [box indices]}``) and each box's match rule/skip reason."""
    assigned: dict[int, list[int]] = {}
    reasons = []
    for b, label in enumerate(detections.labels):
        k, reason = match_label(label, job.phrases)
        reasons.append(reason)
        if k is not None and job.usable[k]:
            assigned.setdefault(k, []).append(b)
    return assigned, reasons


@dataclass(frozen=True)
class Grounder:
    """Everything a shard needs to turn jobs into rows: models, thresholds, batch size, resolution."""

    detector: Detector
    segmenter: Segmenter
    box_threshold: float
    text_threshold: float
    batch_size: int
    resolution: int

    def run(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Rows of ``jobs`` (in order); inference in batches of ``batch_size`` images; a batch that raises
        is retried one image at a time so only the failing image gets ``inference_failed``."""
        todo = [i for i, job in enumerate(jobs) if job.needs_inference]
        found = run_batches([jobs[i] for i in todo], self.batch_size, self._infer, self._failed,
                            name=lambda job: f"image {job.item['image_id']}")
        results = dict(zip(todo, found))
        rows = []
        for i, job in enumerate(jobs):
            rows.extend(results[i] if i in results else rows_for_job(job, None, {}, self.resolution))
        return rows

    def _failed(self, job: Job, err: Exception) -> list[dict[str, Any]]:
        """Rows of a job whose inference raised alone: every phrase ``inference_failed`` with the error."""
        failed = Job(job.item, job.image, "inference_failed", error_text(err), job.phrases, job.usable)
        return rows_for_job(failed, None, {}, self.resolution)

    def _infer(self, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        """Rows of each job of one batch: detect, match labels, segment the matched boxes, union per phrase."""
        images = [job.image for job in jobs]
        found = self.detector.detect(images, [build_prompt(j.phrases) for j in jobs], self.box_threshold,
                                     self.text_threshold)
        plans = [assign_boxes(job, det) for job, det in zip(jobs, found)]
        order = [sorted(b for boxes in plan.values() for b in boxes) for plan, _ in plans]
        masks = self.segmenter.segment(images, [det.boxes[o] for det, o in zip(found, order)])
        out = []
        for job, det, (plan, reasons), o, m in zip(jobs, found, plans, order, masks):
            where = {b: n for n, b in enumerate(o)}
            unions = {k: (np.any(m[[where[b] for b in boxes]], axis=0), boxes) for k, boxes in plan.items()}
            out.append(rows_for_job(job, det, unions, self.resolution, _skip_summary(det.labels, reasons)))
        return out
