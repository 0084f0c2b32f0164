"""The found rule shared by the MultiGen and VISOR scores: an object is found in an image when some box
labelled with it scores above the threshold (strict, SPEC §3.4)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def above_threshold(scores: Sequence[float], threshold: float) -> np.ndarray:
    """(N,) bool: ``score > threshold`` compared in float32, as the detectors' own post-processing compares
    its float32 scores with a Python threshold (a score of exactly float32(0.1) is not above 0.1)."""
    return np.asarray(scores, dtype=np.float32).reshape(-1) > np.float32(threshold)


def found_names(objects: Sequence[str], per_query_max: Sequence[float], threshold: float) -> set[str]:
    """The prompt objects that have a box labelled with them scoring > ``threshold`` (the MG_k rule)."""
    if len(objects) != len(per_query_max):
        raise ValueError(f"{len(objects)} objects but {len(per_query_max)} query scores")
    return {name for name, hit in zip(objects, above_threshold(per_query_max, threshold)) if hit}


def objects_found(objects: Sequence[str], per_query_max: Sequence[float], threshold: float) -> int:
    """``n``: how many distinct prompt objects have a box labelled with them scoring > ``threshold``."""
    return len(found_names(objects, per_query_max, threshold))
