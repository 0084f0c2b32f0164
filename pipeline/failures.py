"""One log line per stage output naming its failed rows: how many of each status, the first few ids, and
whether the next run of the stage retries them or what else fixes them.

Only the stages that record failed rows import this module, so a change here reruns only them. The
per-status wording (``retried by the next run`` / ``not retried: fix the input``) comes from
:func:`pipeline.runtime.status_remedy`, the same words :func:`pipeline.runtime.check_failure_rate` uses
when a stage stops on too many failures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Mapping

from pipeline.runtime import status_remedy
from pipeline.store.shards import STATUS_OK

SHOWN = 3  # ids listed per failed status
MISSING = "missing"  # pseudo-status of expected items that have no row at all


@dataclass
class Failures:
    """Failed rows of one output: ``counts`` (status -> rows, first-seen order), ``examples`` (status ->
    its first distinct ids), ``unlisted`` (statuses with more distinct ids than listed) and ``total`` (all
    rows, failed or not, plus missing ones)."""

    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    unlisted: set[str] = field(default_factory=set)

    @property
    def failed(self) -> int:
        """Rows that failed, of every status."""
        return sum(self.counts.values())


def collect_failures(rows: Iterable[Mapping[str, Any]], id_of: Callable[[Mapping[str, Any]], str],
                     failed: Collection[str] | None = None, missing: int = 0, shown: int = SHOWN) -> Failures:
    """Count the failed ``rows`` by their ``status`` and keep the first ``shown`` distinct ids of each.

    Args:
        rows: mappings with a ``status`` key.
        id_of: the id a log line names a row by (e.g. ``"12/3"`` for prompt 12, image 3).
        failed: the statuses that count as failures; None: every status other than ``ok`` (statuses outside
            ``failed`` are outcomes, e.g. a phrase without a mask, and are not listed).
        missing: expected items without any row; counted under :data:`MISSING` (no ids) and in the total.
    """
    out = Failures(total=missing)
    for row in rows:
        out.total += 1
        status = str(row["status"])
        if status == STATUS_OK or (failed is not None and status not in failed):
            continue
        out.counts[status] = out.counts.get(status, 0) + 1
        ids = out.examples.setdefault(status, [])
        name = str(id_of(row))
        if name in ids:
            continue
        if len(ids) < shown:
            ids.append(name)
        else:
            out.unlisted.add(status)
    if missing:
        out.counts[MISSING] = missing
    return out


def describe_failures(failures: Failures, retried: Collection[str], remedies: Mapping[str, str] | None = None,
                      id_name: str = "") -> str:
    """``"2 edit_failed (retried by the next run; 0004, 0012), 1 bad_input (not retried: fix the input; 0007)"``:
    each failed status with its count, its remedy (:func:`pipeline.runtime.status_remedy`) and its first ids,
    prefixed by ``id_name`` (what the ids are, e.g. ``"prompt/image"``)."""
    parts = []
    for status, count in failures.counts.items():
        ids = failures.examples.get(status, [])
        more = ", ..." if status in failures.unlisted else ""
        shown = f"; {id_name + ' ' if id_name else ''}{', '.join(ids)}{more}" if ids else ""
        parts.append(f"{count} {status} ({status_remedy(status, retried, remedies)}{shown})")
    return ", ".join(parts)


def summarize_failures(rows: Iterable[Mapping[str, Any]], id_of: Callable[[Mapping[str, Any]], str],
                       retried: Collection[str], *, where: str, remedies: Mapping[str, str] | None = None,
                       failed: Collection[str] | None = None, missing: int = 0, unit: str = "rows",
                       id_name: str = "") -> str | None:
    """The one log line about the failed rows of one output, or None when none failed.

    ``"edit base: 3 of 120 rows failed: 2 edit_failed (retried by the next run; 0004, 0012), 1 bad_input
    (not retried: fix the input; 0007)"``. ``retried`` are the statuses the stage's next run computes again
    (its ``redo_statuses``); ``remedies`` give a status its own text instead of the default one; ``failed``,
    ``missing``: as in :func:`collect_failures`; ``unit`` names the rows (``images``, ``edits``).
    """
    failures = collect_failures(rows, id_of, failed, missing)
    return failure_line(failures, retried, where=where, remedies=remedies, unit=unit, id_name=id_name)


def failure_line(failures: Failures, retried: Collection[str], *, where: str,
                 remedies: Mapping[str, str] | None = None, unit: str = "rows", id_name: str = "") -> str | None:
    """:func:`summarize_failures` of failures already collected (None when there are none)."""
    if not failures.failed:
        return None
    return (f"{where}: {failures.failed} of {failures.total} {unit} failed: "
            f"{describe_failures(failures, retried, remedies, id_name)}")


def report_failures(log: logging.Logger, rows: Iterable[Mapping[str, Any]],
                    id_of: Callable[[Mapping[str, Any]], str], retried: Collection[str], *, where: str,
                    remedies: Mapping[str, str] | None = None, failed: Collection[str] | None = None,
                    missing: int = 0, unit: str = "rows", id_name: str = "") -> Failures:
    """Log :func:`summarize_failures`'s line as a warning (nothing when no row failed) and return the
    failures, whose ``counts`` :func:`pipeline.runtime.check_failure_rate` takes."""
    failures = collect_failures(rows, id_of, failed, missing)
    line = failure_line(failures, retried, where=where, remedies=remedies, unit=unit, id_name=id_name)
    if line:
        log.warning("%s", line)
    return failures


def prompt_image_id(row: Mapping[str, Any]) -> str:
    """``"<prompt_id>/<image_index>"``: how MultiGen and VISOR rows are named in failure lines."""
    return f"{row['prompt_id']}/{row['image_index']}"
