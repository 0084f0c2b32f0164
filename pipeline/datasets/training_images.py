"""The training-images shard directory (``artifacts/data/images``): rows of COCO or demo images."""

from __future__ import annotations

from pathlib import Path

from pipeline.store.shards import STATUS_OK, iter_rows


def image_set_summary(out_dir: Path) -> dict[str, int]:
    """Flat counts of a training-images shard directory (``artifacts/data/images``, COCO or demo): ``images``,
    ``ok``, ``failed`` and one count per failure status (e.g. ``download_failed``), ``train`` and ``heldout``
    (usable images of each split) and ``objects`` (object masks, demo images only)."""
    counts = {"images": 0, "ok": 0, "failed": 0, "train": 0, "heldout": 0, "objects": 0}
    for row in iter_rows(Path(out_dir), columns=["split", "objects", "status"]):
        counts["images"] += 1
        if row["status"] != STATUS_OK:
            counts["failed"] += 1
            counts[row["status"]] = counts.get(row["status"], 0) + 1
            continue
        counts["ok"] += 1
        if row["split"] in ("train", "heldout"):
            counts[row["split"]] += 1
        counts["objects"] += len(row["objects"] or [])
    return counts
