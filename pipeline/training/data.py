"""Training batches: the image transform, the dataset, the collate function and the data order (SPEC §1.5).

The data order is a fixed function of the seed and the micro-step (one shuffled permutation per epoch), so a
run resumed from a checkpoint sees the batches an uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from pipeline.geometry import resize_center_crop
from pipeline.seeding import numpy_rng
from pipeline.store.codecs import image_from_bytes, rle_decode
from pipeline.training.losses import GroundingTargets
from pipeline.training.records import MAX_TOKENS, TrainRecord


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> (3, R, R) float in [-1, 1] after :func:`resize_center_crop`."""
    arr = np.asarray(resize_center_crop(image.convert("RGB"), resolution), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2.0 - 1.0


class GroundedImageDataset(Dataset):
    """Training examples: ``{"pixel_values": (3, R, R), "input_ids": (77,), "masks": list of (R, R) bool,
    "token_ids": list of index lists, "image_id": str}``."""

    def __init__(self, records: Sequence[TrainRecord], tokenizer: Any, resolution: int):
        self.records = list(records)
        self.tokenizer = tokenizer
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        ids = self.tokenizer(r.caption, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids[0]
        return {
            "pixel_values": image_tensor(image_from_bytes(r.image), self.resolution),
            "input_ids": ids,
            "masks": [torch.from_numpy(rle_decode(w.train_mask)) for w in r.words],
            "token_ids": [list(w.token_indices) for w in r.words],
            "image_id": r.image_id,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and token ids; pad words into :class:`GroundingTargets`."""
    resolution = items[0]["pixel_values"].shape[-1]
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "input_ids": torch.stack([it["input_ids"] for it in items]),
        "targets": GroundingTargets.from_lists([it["masks"] for it in items], [it["token_ids"] for it in items],
                                               resolution),
        "image_ids": [it["image_id"] for it in items],
    }


class StreamBatchSampler(Sampler[list[int]]):
    """Batches of micro-steps ``start .. start+count-1`` from an endless stream of epoch permutations.

    Position ``p`` of the stream is ``perm(p // n)[p % n]`` with ``perm(e)`` drawn from (seed, epoch e).
    Micro-step ``m`` takes positions ``[m·G + r·B, m·G + (r+1)·B)`` on rank ``r`` (G = B · world size), so
    the order depends on nothing but the seed: resuming at micro-step ``start`` continues it exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, count: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.count, self.rank, self.world = start, count, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _at(self, position: int) -> int:
        epoch = position // self.n
        if epoch not in self._perms:
            self._perms = {epoch: numpy_rng(self.seed, "train-order", epoch).permutation(self.n)}
        return int(self._perms[epoch][position % self.n])

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch_size * self.world
        for m in range(self.start, self.start + self.count):
            first = m * g + self.rank * self.batch_size
            yield [self._at(p) for p in range(first, first + self.batch_size)]
