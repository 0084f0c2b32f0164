"""MultiGen scores (SPEC §3.4) from detection rows: an image finds object ``q`` when some box labelled ``q``
scores > threshold (strict); ``n`` = distinct objects found; ``MG_k`` = 100 x share of images with
``n >= k``; its std is the population std (ddof = 0) over image index ``j`` of the per-index success rates.
No torch here: scoring reads the stored per-query maxima, so any threshold is rescored without detecting again."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from pipeline.config import InputDataError
from pipeline.multigen.found import found_names, objects_found
from pipeline.names import MG_LEVELS
from pipeline.store.shards import STATUS_OK


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


def found_grid(records: Iterable[dict[str, Any]], threshold: float, num_prompts: int,
               images_per_prompt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(found, valid, seen), each (P, J): objects found per image, images scored (status ok), images with a
    detection row; a row outside the (P, J) grid is an error (detections of other sampling params)."""
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
    return found, valid, seen


def found_table(prompt_set: str, found: np.ndarray, valid: np.ndarray) -> pd.DataFrame:
    """One row per image of a (P, J) grid: ``prompt_set``, ``prompt_id``, ``image_index``, ``found`` (objects
    found) and ``scored`` (1 when the image was scored, else 0 and ``found`` 0): the units of the paired
    bootstrap (:mod:`pipeline.compare`)."""
    prompts, images = np.indices(found.shape)
    return pd.DataFrame({"prompt_set": prompt_set, "prompt_id": prompts.ravel(), "image_index": images.ravel(),
                         "found": np.where(valid, found, 0).ravel(), "scored": valid.ravel().astype(np.int64)})


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
    return grid_scores(*found_grid(records, threshold, num_prompts, images_per_prompt))


def grid_scores(found: np.ndarray, valid: np.ndarray, seen: np.ndarray) -> dict[str, float]:
    """:func:`mg_scores` of a (P, J) grid of :func:`found_grid` with the image counts ``images_expected``,
    ``images_scored``, ``images_failed`` (a row that is not ok) and ``images_missing`` (no row)."""
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
