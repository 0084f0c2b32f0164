"""The params sections of Grounded-SAM: method thresholds (``grounding``) and per-profile scale (``masks``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import DtypeName, Fraction, NonNegativeInt, PositiveInt


@dataclass(frozen=True)
class GroundingCfg:
    """Top-level ``grounding`` params (method hyperparameters, identical in every profile)."""

    box_threshold: Fraction  # keep a box when its best token's sigmoid passes this (SPEC §2.4: 0.25)
    text_threshold: Fraction  # tokens of a kept box above this form its label (SPEC §2.4: 0.25)
    max_input_error_rate: Fraction  # fail when more rows than this have bad input (summary.INPUT_ERRORS)
    max_failed_rate: Fraction = 0.01  # fail when more rows than this are inference_failed (a rerun retries them)


@dataclass(frozen=True)
class MasksScale:
    """``profiles.<p>.masks`` params."""

    source: Literal["grounded_sam", "authors"]
    detector: str  # Grounding DINO reference (hub id, local dir, embedded:NAME)
    segmenter: str  # SAM / SAM-HQ reference, or a segment-anything ``.pth`` checkpoint
    batch_size: PositiveInt  # images per forward pass
    shard_size: PositiveInt  # captions per shard
    dtype: DtypeName  # auto: float16 on CUDA, float32 on CPU
    overlay_images: NonNegativeInt  # images drawn in plots/masks_overlay.png
    authors_metadata: str = ""  # source authors: the authors' metadata.jsonl
    authors_masks: str = ""  # source authors: folder <img_id>/mask_<img_id>_<word>.png
