"""What both mask sources read: where a run reads and writes (:class:`RunContext`), and the nouns rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.store import shards

NOUNS_COLUMNS = ["image_id", "caption", "phrases", "token_indices", "phrase_status", "phrase_error", "status", "error"]


@dataclass(frozen=True)
class RunContext:
    """Where a stage run reads and writes, and how it is split: paths, rank, device."""

    out_dir: Path
    nouns_dir: Path
    images_dir: Path
    models_dir: Path
    resolution: int
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] | None = None


def read_nouns(nouns_dir: Path) -> list[dict[str, Any]]:
    """All ``artifacts/nouns`` rows (shard order) as dicts."""
    return list(shards.iter_rows(Path(nouns_dir), columns=NOUNS_COLUMNS))
