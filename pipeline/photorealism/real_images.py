"""The real images of the FID reference sets (``artifacts/data/fid/images/<name>/``, written by ``fid_data``) as
the extractor sees them: the centre square, resized with PIL bicubic to ``profiles.<p>.fid.image_size``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from pipeline.store.shards import STATUS_OK, iter_rows

IMAGES_DIR = Path("artifacts/data/fid/images")


def square_image(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the centre square of ``image`` (RGB) resized with PIL bicubic."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def real_image_batches(images_dir: Path, size: int, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 (B, size, size, 3) batches of the usable real images of a reference set, in shard order."""
    batch: list[np.ndarray] = []
    for row in iter_rows(images_dir, columns=["image", "status"]):
        if row["status"] != STATUS_OK:
            continue
        with Image.open(io.BytesIO(row["image"])) as image:
            batch.append(square_image(image, size))
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
