"""Encodings of shard cells: images as PNG bytes, masks as COCO RLE (DESIGN §4 "Artifacts")."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """Encode a PIL image or an (H, W[, C]) uint8 array as PNG bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_from_bytes(data: bytes, mode: str = "RGB") -> Image.Image:
    """Decode PNG/JPEG bytes into a PIL image in ``mode``."""
    return Image.open(io.BytesIO(data)).convert(mode)


def decode_error(data: bytes | None) -> str | None:
    """Why ``data`` does not decode as an image (every pixel is read), or ``None`` when it does."""
    if not data:
        return "no image bytes"
    try:
        image_from_bytes(data)
    except Exception as err:  # noqa: BLE001 - PIL raises several types for bad bytes
        return f"{type(err).__name__}: {err}"
    return None


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a binary (H, W) mask: ``{"size": [H, W], "counts": str}`` (pycocotools)."""
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects an (H, W) mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode :func:`rle_encode` output back into an (H, W) bool mask."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)
