"""The ``masks`` stage's metrics: row statuses, counts of ``artifacts/masks`` rows, the failure report and the
checks that end the stage when too many rows failed."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from pipeline.config import MissingInputError
from pipeline.failures import report_failures
from pipeline.masks.params import GroundingCfg
from pipeline.runtime import FailureRateError, check_failure_rate
from pipeline.store.shards import STATUS_OK

log = logging.getLogger(__name__)

# Row statuses of artifacts/masks/ (``status`` column).
MASK_STATUSES = {
    STATUS_OK: "mask found; train_mask has at least one pixel",
    "missing_image": "no usable row for the image in artifacts/data/images (absent or failed)",
    "corrupt_image": "the image bytes do not decode",
    "no_phrases": "the caption has no noun phrase (one row with phrase '')",
    "empty_phrase": "the phrase is empty",
    "not_aligned": "the phrase has no CLIP token indices (artifacts/nouns phrase_status)",
    "no_detection": "no detected box matched the phrase (authors: their mask path is null)",
    "empty_mask": "the union of the phrase's SAM masks has no pixel",
    "outside_crop": "the mask lies outside the training centre crop (train_mask empty)",
    "inference_failed": "Grounding DINO or SAM raised on this image (message in error)",
    "missing_mask_file": "authors: the mask file does not exist",
    "corrupt_mask": "authors: the mask file does not decode",
    "blank_mask": "authors: the PNG is all black (empty, or whole-image: plt.imsave quirk, SPEC §1.6 item 7)",
    "bad_metadata": "authors: the metadata line is not valid JSON with file_name/text/attn_list",
    "unsafe_mask_path": "authors: the mask path leaves the mask folder (absolute, '..' or a link out); not read",
}
INPUT_ERRORS = ("missing_image", "corrupt_image", "bad_metadata", "missing_mask_file", "corrupt_mask",
                "unsafe_mask_path")
INFERENCE_FAILED = "inference_failed"
RETRIED = {INFERENCE_FAILED}  # write_grounded_masks' redo_statuses
REMEDIES = {status: f"not retried: fix the input: {MASK_STATUSES.get(status, status)}" for status in INPUT_ERRORS} | {
    "missing_image": "not retried: the image has no usable row in artifacts/data/images; train_data fetches failed "
                     "downloads again, and these rows are computed again when its output changes"}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Flat counts of artifacts/masks rows: images, phrases, masks, areas, rows by status."""
    from pycocotools import mask as mask_utils

    counts: dict[str, Any] = {f"status_{s}": 0 for s in MASK_STATUSES}
    images = {str(r["image_id"]) for r in rows}
    bad_images = {str(r["image_id"]) for r in rows if r["status"] in INPUT_ERRORS}
    ok = [r for r in rows if r["status"] == STATUS_OK]
    for r in rows:
        counts[f"status_{r['status']}"] = counts.get(f"status_{r['status']}", 0) + 1

    def area(rle: dict[str, Any]) -> float:
        h, w = rle["size"]
        return float(mask_utils.area({"size": list(rle["size"]), "counts": rle["counts"].encode()})) / (h * w)

    counts.update(
        rows=len(rows), images=len(images), images_with_mask=len({str(r["image_id"]) for r in ok}),
        phrases=sum(1 for r in rows if r["phrase"]), phrases_with_mask=len(ok),
        masks_per_image=len(ok) / max(1, len(images - bad_images)),
        mean_mask_area=float(np.mean([area(r["mask"]) for r in ok])) if ok else 0.0,
        mean_train_mask_area=float(np.mean([area(r["train_mask"]) for r in ok])) if ok else 0.0,
        input_errors=sum(1 for r in rows if r["status"] in INPUT_ERRORS),
    )
    counts["input_error_rate"] = counts["input_errors"] / len(rows) if rows else 0.0
    return counts


def check_input_errors(metrics: dict[str, Any], max_rate: float) -> None:
    """Raise when no row was written or the share of rows with bad input passes ``max_rate``."""
    if metrics["rows"] == 0:
        raise MissingInputError("masks: no rows; run the nouns and train_data stages first")
    if metrics["input_error_rate"] > max_rate:
        raise FailureRateError(
            f"masks: {metrics['input_errors']} of {metrics['rows']} rows have a missing/corrupt image, bad "
            f"metadata, a missing/corrupt authors' mask file or an unsafe mask path "
            f"({metrics['input_error_rate']:.1%} > grounding.max_input_error_rate={max_rate:.1%}); "
            f"see status/error in artifacts/masks/")


def report_and_check(rows: Sequence[dict[str, Any]], metrics: dict[str, Any], cfg: GroundingCfg, out: str) -> None:
    """Log the failed rows of ``out`` (which the next run retries, what fixes the others), then end the stage
    when the input errors or the failed inferences pass their limits (``grounding.max_*_rate``)."""
    report_failures(log, rows, lambda row: str(row["image_id"]), RETRIED, where=f"masks {out}", remedies=REMEDIES,
                    failed={INFERENCE_FAILED, *INPUT_ERRORS}, id_name="image")
    check_input_errors(metrics, cfg.max_input_error_rate)
    check_failure_rate({INFERENCE_FAILED: metrics.get(f"status_{INFERENCE_FAILED}", 0)}, metrics["rows"],
                       cfg.max_failed_rate, "masks rows (Grounding DINO or SAM raised)", "grounding.max_failed_rate",
                       f"see the `error` column of {out}", retried=RETRIED)
