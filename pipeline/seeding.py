"""Deterministic random streams keyed by (global seed, item key).

Every random draw in the project comes from a generator made here, so any subset of items reproduces
exactly (DESIGN §5): image ``j`` of prompt ``p`` gets the same noise whether it is sampled alone, in a
batch, on another rank, or after a resume.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

import numpy as np
import torch


def derive_seed(seed: int, *key: object) -> int:
    """A 63-bit integer seed derived from ``seed`` and the parts of ``key`` (stable across runs/OSes)."""
    text = "/".join([str(seed), *map(str, key)])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def standard_normal(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """(B, *shape) fp32 CPU draws from N(0, I): row ``b`` comes from ``generators[b]`` alone, so an image's
    noise does not depend on the batch it is drawn in."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])


def torch_generator(seed: int, *key: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from (``seed``, ``key``): draws are the same on every device."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *key))
    return gen


def numpy_rng(seed: int, *key: object) -> np.random.Generator:
    """A NumPy ``Generator`` seeded from (``seed``, ``key``)."""
    return np.random.default_rng(derive_seed(seed, *key))


def python_rng(seed: int, *key: object) -> random.Random:
    """A ``random.Random`` seeded from (``seed``, ``key``)."""
    return random.Random(derive_seed(seed, *key))
