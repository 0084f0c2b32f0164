"""Params of MultiGen detection and scoring: ``multigen`` (method, every profile) and ``profiles.<p>.multigen``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pipeline.config import DtypeName, Fraction, FractionBelowOne, NonEmpty, PositiveInt


@dataclass(frozen=True)
class MultiGenCfg:
    """Top-level ``multigen`` params: method settings shared by every profile (SPEC §3.3-3.4)."""

    threshold: FractionBelowOne = 0.1         # found: a box scores > this
    query_template: str = "a photo of a {name}"
    prompt_sets: Annotated[tuple[str, ...], NonEmpty()] = ("coco", "ade20k")
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
