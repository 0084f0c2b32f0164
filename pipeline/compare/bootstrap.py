"""Paired bootstrap confidence intervals of the difference of two models' scores (Efron & Tibshirani 1993, ch. 13).

Both models are scored on the same units (MultiGen prompts with the same seeds, PIE-Bench images), so units
are resampled together: each bootstrap replicate draws ``n`` units with replacement, the same draw for both
models, and recomputes both scores on it. Every score here is a ratio of sums over units, ``sum(num) /
sum(den)``: a mean of per-image values (``den`` = 1 per scored value), or MG_k (``num`` = 100 x images of the
prompt with at least ``k`` objects found, ``den`` = scored images of the prompt). The interval is the
percentile interval of the replicated differences; a difference is *beyond the noise* when the interval
excludes 0. The two-sided bootstrap p-value (twice the smaller share of replicates on either side of 0)
goes with it, so that the comparisons of one score can be corrected for their number (:func:`holm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A score difference ``a - b`` and its paired-bootstrap percentile interval at ``level``."""

    diff: float
    low: float
    high: float
    level: float
    units: int
    p: float = float("nan")  # two-sided bootstrap p-value of a zero difference (:func:`bootstrap_p`)

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0 (the difference is beyond the resampling noise)."""
        return bool(self.low > 0 or self.high < 0)


def ratio(num: np.ndarray, den: np.ndarray) -> float:
    """``sum(num) / sum(den)`` (NaN when ``sum(den)`` is 0)."""
    total = float(np.sum(den))
    return float(np.sum(num)) / total if total > 0 else float("nan")


@lru_cache(maxsize=2)
def resample_weights(units: int, reps: int, seed: int) -> np.ndarray:
    """(reps, units) how often each unit is drawn in each replicate: multinomial(units, 1/units) rows,
    from a NumPy generator seeded with ``seed``. Read-only and cached: the scores of one unit set (the MG
    levels of a prompt set, the VISOR scores, the PIE-Bench columns) share one draw instead of redrawing it."""
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(units, np.full(units, 1.0 / units), size=reps).astype(np.float64)
    weights.flags.writeable = False
    return weights


def replicate_ratios(weights: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """(reps,) the ratio ``sum(w * num) / sum(w * den)`` of each replicate's unit counts ``w`` (a row of
    ``weights``, (reps, n)); NaN where a replicate draws no scored unit."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return weights @ np.asarray(num, dtype=np.float64) / (weights @ np.asarray(den, dtype=np.float64))


def bootstrap_p(finite: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a zero difference from (reps,) finite replicates: twice the smaller
    share of replicates at or below 0 and at or above 0, at most 1 (all replicates 0 give 1)."""
    return float(min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0))))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979) of one family of tests, in the input order: the i-th
    smallest of the m finite p-values becomes ``max over j <= i of min(1, (m - j + 1) * p_(j))``; NaN stay NaN
    and do not count in m. A test is significant at familywise error ``alpha`` when its adjusted p < alpha."""
    values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(values.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(values[finite], kind="stable")]
    m = order.size
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def percentile_interval(diff: float, replicates: np.ndarray, level: float, units: int) -> Interval:
    """The :class:`Interval` of ``diff`` from its (reps,) bootstrap ``replicates`` (non-finite ones dropped),
    with its :func:`bootstrap_p`."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    finite = replicates[np.isfinite(replicates)]
    if not np.isfinite(diff) or finite.size == 0:
        return Interval(float(diff), float("nan"), float("nan"), level, units)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(diff), float(low), float(high), level, units, bootstrap_p(finite))


def paired_interval(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray,
                    reps: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Paired bootstrap interval of ``ratio(num_a, den_a) - ratio(num_b, den_b)``.

    Args:
        num_a, den_a, num_b, den_b: (n,) per-unit sums of the two models on the same ``n`` units, in the same
            order (a unit a model could not score has ``num = den = 0``).
        reps: bootstrap replicates; level: coverage of the interval (0.95: 2.5th to 97.5th percentile);
        seed: seed of the resampling (the same seed gives the same interval).
    Returns:
        :class:`Interval` with the full-sample difference and the percentile interval; replicates whose
        draw leaves a model with no scored unit are dropped.
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"per-unit arrays must share one (n,) shape, got {[a.shape for a in arrays]}")
    num_a, den_a, num_b, den_b = arrays
    diff = ratio(num_a, den_a) - ratio(num_b, den_b)
    if num_a.size == 0:
        return percentile_interval(diff, np.zeros(0), level, 0)
    weights = resample_weights(num_a.size, reps, seed)
    replicates = replicate_ratios(weights, num_a, den_a) - replicate_ratios(weights, num_b, den_b)
    return percentile_interval(diff, replicates, level, num_a.size)
