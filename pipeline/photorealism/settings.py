"""Params of the photorealism stages (docs/fid.md).

``fid`` (every profile): failure tolerance. ``profiles.<p>.fid``: the reference sets (COCO val2017 captions
and images, Flickr30K Entities val, or drawn demo scenes), the feature extractor and the CLIP model.
The latency settings are in :mod:`pipeline.photorealism.latency`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.clip_ref import check_clip_ref
from pipeline.config import Fraction, PositiveInt
from pipeline.fetch import check_sha256_param

ReferenceSource = Literal["demo", "coco", "flickr30k_entities"]
ExtractorKind = Literal["embedded", "inception"]

FID_SAMPLES_DIR = Path("artifacts/fid_samples")  # fid_sample@<model> writes <model>/<set>/, fid@<model> reads it

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "demo": ("num_images",),
    "coco": ("captions", "image_base_url"),
    "flickr30k_entities": ("root",),
}


@dataclass(frozen=True)
class FidCfg:
    """Top-level ``fid``: method settings identical in every profile."""

    max_failed_rate: Fraction = 0.01  # fid_data / fid_sample fail when a larger share of images failed


@dataclass(frozen=True)
class ReferenceSpec:
    """``profiles.<p>.fid.references.<name>``: where one reference set's captions and real images come from.

    * ``demo``: ``num_images`` drawn scenes with their captions (offline);
    * ``coco``: ``captions`` (``captions_val2017.json``, or the ``annotations_trainval2017.zip`` holding it;
      URL or path, pinned by ``captions_sha256``) and the images under ``image_base_url``;
    * ``flickr30k_entities``: a local folder ``root`` with ``val.txt``, ``Sentences/`` and ``flickr30k-images/``.

    ``num_captions``: captions drawn (seeded, without replacement) from the set's captions; null: one per
    real image (Flickr30K: each val image's seeded choice among its five).
    """

    source: ReferenceSource
    num_captions: PositiveInt | None = None
    num_images: PositiveInt | None = None
    captions: str | None = None
    captions_sha256: str | None = None
    image_base_url: str | None = None
    root: str | None = None

    def __post_init__(self) -> None:
        missing = [k for k in REQUIRED_FIELDS[self.source] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"source {self.source}: set {', '.join(missing)}")
        check_sha256_param(self.captions_sha256, "captions_sha256")


@dataclass(frozen=True)
class FidScale:
    """``profiles.<p>.fid``: reference sets, feature extractor, CLIP model and batch sizes."""

    references: dict[str, ReferenceSpec]
    extractor: ExtractorKind = "inception"   # embedded: the seeded tiny CNN; inception: torch-fidelity's
    inception_weights: str | None = None     # null: $TORCH_HOME/hub/checkpoints/weights-inception-...pth
    clip_model: str = "ViT-L-14:openai"
    batch_size: PositiveInt = 32             # images per extractor and CLIP forward pass
    shard_size: PositiveInt = 256            # reference images per shard (unit of resume of downloads)
    image_size: PositiveInt = 512            # real images: centre square crop resized to this side (bicubic)

    def __post_init__(self) -> None:
        check_clip_ref(self.clip_model)
        bad = [name for name in self.references if not name.replace("_", "").isalnum()]
        if bad or not self.references:
            raise ValueError(f"references: give one or more sets named with letters, digits and _ (got "
                             f"{list(self.references) or 'none'})")


@dataclass(frozen=True)
class EmbeddedSeed:
    """``profiles.<p>.embedded_seed``: the seed of the embedded models (the demo's tiny FID extractor too)."""

    embedded_seed: int
