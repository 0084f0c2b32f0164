"""What the failures of stage ``visor@<model>`` mean, which the next run retries, and the lines that report them.

A VISOR run has two phases, sampling (``artifacts/visor/<model>/samples``) and detection (``.../detections``);
every failed sample is a ``no_image`` detection, so the detections' counts are the ones checked against
``visor.max_failed_rate``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.failures import MISSING, prompt_image_id, report_failures
from pipeline.multigen.detection import STATUS_CORRUPT_IMAGE, STATUS_DETECT_FAILED, STATUS_NO_IMAGE
from pipeline.sampling.remedies import SAMPLE_REMEDIES, SAMPLE_RETRIED
from pipeline.store.shards import iter_rows

log = logging.getLogger("stages.visor")
# What the next run computes again: sample_prompt_set's and detect_prompt_set's redo_statuses, and the
# detections of images sampled again.
RETRIED = SAMPLE_RETRIED | {STATUS_DETECT_FAILED}
REMEDIES = {**SAMPLE_REMEDIES,
            STATUS_NO_IMAGE: "its sampling failed (see the samples line): sample_failed images are sampled and "
                             "detected again by the next run, nan_image and token_indices_failed are not",
            STATUS_CORRUPT_IMAGE: "not retried: the sampled PNG does not decode; delete its shard in samples/",
            MISSING: "no detection row: the next run computes the shards that lack one"}


def report_lines(key: str, out: Path, missing: int) -> dict[str, int]:
    """Log a line on the failed samples of ``out`` and one on its failed detections (every failed sample is a
    ``no_image`` detection); return the detections' counts by status, with ``missing`` images."""
    columns = ["prompt_id", "image_index", "status"]
    report_failures(log, iter_rows(out / "samples", columns), prompt_image_id, RETRIED, where=f"visor@{key} samples",
                    remedies=REMEDIES, unit="images", id_name="prompt/image")
    detections = report_failures(log, iter_rows(out / "detections", columns), prompt_image_id, RETRIED,
                                 where=f"visor@{key} detections", remedies=REMEDIES, missing=missing, unit="images",
                                 id_name="prompt/image")
    return detections.counts
