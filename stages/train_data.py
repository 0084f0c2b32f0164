"""Stage `train_data`: the captioned training images, one shard row per image.

``source: demo`` draws the synthetic set (pipeline.datasets.demo_images); ``source: coco`` reads
TokenCompose's training metadata and fetches its COCO train2017 images (pipeline.datasets.coco_images).
Outs: artifacts/data/images/ (persistent shards), metrics/train_data.json. A rerun keeps finished shards
after verifying them (page checksums, every stored image decoded) and computes damaged ones again, so
`dvc repro train_data` repairs the shards a consumer (`train`, `masks`) reports as damaged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import Fraction, FractionBelowOne, PositiveInt, load_params, section
from pipeline.datasets.demo_images import write_demo_training_set
from pipeline.datasets.demo_scale import DemoDataScale
from pipeline.datasets.training_images import image_set_summary
from pipeline.fetch import check_sha256_param
from pipeline.runtime import check_failure_rate, run_stage, stage_argument, write_json

log = logging.getLogger("stages.train_data")
OUT = Path("artifacts/data/images")


@dataclass(frozen=True)
class TrainDataScale:
    """``profiles.<p>.data``: where the training images come from and how they are sharded."""

    source: Literal["demo", "coco"]
    shard_size: PositiveInt
    heldout_fraction: FractionBelowOne
    max_failed_rate: Fraction = 0.01  # fail when more images than this could not be downloaded or decoded
    tokencompose_metadata: str = ""  # coco: URL or path of TokenCompose's train metadata.jsonl
    tokencompose_metadata_sha256: str | None = None  # coco: its SHA-256, checked on reading; None: not checked
    image_base_url: str = ""  # coco: URL or folder the COCO train2017 file names are joined to

    def __post_init__(self) -> None:
        check_sha256_param(self.tokencompose_metadata_sha256, "tokencompose_metadata_sha256")


def main() -> None:
    params = load_params()
    cfg = section(params, "profile.data", TrainDataScale)
    seed = params["seed"]
    if cfg.source == "demo":
        demo = section(params, "profile.demo_data", DemoDataScale)
        write_demo_training_set(OUT, demo.num_images, demo.image_size, seed, cfg.shard_size, cfg.heldout_fraction)
    else:
        from pipeline.datasets.coco_images import write_coco_training_set

        write_coco_training_set(metadata=cfg.tokencompose_metadata, image_base_url=cfg.image_base_url,
                                out_dir=OUT, shard_size=cfg.shard_size,
                                heldout_fraction=cfg.heldout_fraction, seed=seed,
                                metadata_sha256=cfg.tokencompose_metadata_sha256)
    summary = image_set_summary(OUT)
    log.info("train_data: %s", summary)
    check_failure_rate(summary["failed"], summary["images"], cfg.max_failed_rate, "train_data images",
                       f"profiles.{params['profile']}.data.max_failed_rate",
                       f"see the `status`/`error` columns of {OUT} (failed downloads are fetched again on a rerun)")
    write_json("metrics/train_data.json", {"profile": params["profile"], "source": cfg.source, "seed": seed,
                                           "heldout_fraction": cfg.heldout_fraction, **summary})


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
