"""Image geometry shared by the masks and training stages: the training crop at the training resolution.

The masks stage stores each mask at the training resolution with the same transform the trainer applies to
its image, so a mask pixel and an image pixel always cover the same place (SPEC §1.1).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The training image transform's geometry (SPEC §1.1): resize the shorter side to ``resolution``
    (bilinear, PIL, antialiased; longer side truncated as torchvision does), then centre-crop to
    ``resolution`` x ``resolution`` (torchvision's rounding)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = TF.resize(image, resolution, interpolation=InterpolationMode.BILINEAR)
    return TF.center_crop(image, [resolution, resolution])


def train_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    """(H, W) bool mask -> (resolution, resolution) bool: :func:`resize_center_crop` on a 0/255 image, > 0."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L")
    return np.asarray(resize_center_crop(image, resolution)) > 0
