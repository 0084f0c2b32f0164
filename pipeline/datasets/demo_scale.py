"""``profiles.<p>.demo_data``: the sizes of the synthetic demo sets (training images, prompts, edits)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Pixels, PositiveInt


@dataclass(frozen=True)
class DemoDataScale:
    """``profiles.<p>.demo_data``: sizes of the synthetic demo sets."""

    num_images: PositiveInt  # captioned training images
    image_size: Pixels  # shorter side in pixels; non-square images are 5/4 as long
    num_prompts: PositiveInt  # prompts per generated MultiGen set
    num_edits: PositiveInt  # editing examples in the demo PIE-Bench set
