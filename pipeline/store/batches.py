"""Batched work with per-item retry: the one exception policy of every stage that computes rows.

A batch that raises is retried one item at a time, so one bad item (an image that overflows, a prompt the
model cannot take, an out-of-memory spike) fails only itself; an item that raises alone becomes a failure
result, recorded in its row with a status and an error (never dropped), counted by the stage and retried by
its next run. Any ``Exception`` counts; ``KeyboardInterrupt`` and ``SystemExit`` stop the stage.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


def run_batches(items: Sequence[T], batch_size: int, run: Callable[[list[T]], Sequence[R]],
                failed: Callable[[T, Exception], R], name: Callable[[T], str] = str) -> list[R]:
    """``run`` over ``items`` in batches of ``batch_size``: one result per item, in order.

    Args:
        items: the work items.
        batch_size: items per call of ``run`` (> 0).
        run: computes the results of a batch, one per item, in order.
        failed: the result of an item whose computation raised even alone (the exception is passed).
        name: how the log names an item (an image id, "prompt 3 image 1").
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    results: list[R] = []
    for start in range(0, len(items), batch_size):
        results.extend(_run_batch(list(items[start:start + batch_size]), run, failed, name))
    return results


def _run_batch(batch: list[T], run: Callable[[list[T]], Sequence[R]], failed: Callable[[T, Exception], R],
               name: Callable[[T], str]) -> list[R]:
    """Results of one batch; on an exception, of each item alone."""
    try:
        out = list(run(batch))
    except Exception as err:  # noqa: BLE001 - the policy of this module: recorded per item, never swallowed
        if len(batch) == 1:
            log.error("%s failed: %s: %s (recorded in its row; a rerun retries it)", name(batch[0]),
                      type(err).__name__, err)
            return [failed(batch[0], err)]
        log.warning("batch of %d (%s, ...) failed (%s: %s); retrying item by item", len(batch), name(batch[0]),
                    type(err).__name__, err)
        return [r for item in batch for r in _run_batch([item], run, failed, name)]
    if len(out) != len(batch):
        raise RuntimeError(f"run_batches: {len(out)} results for a batch of {len(batch)} items")
    return out


def error_text(err: Exception) -> str:
    """The ``error`` cell of a row whose computation raised: ``"<type>: <message>"``."""
    return f"{type(err).__name__}: {err}"
