"""The building blocks of the results page and the cell formatting every table shares.

A report is a list of :class:`Section` objects holding :class:`Table`, :class:`Figure` and :class:`Text`
blocks; :mod:`pipeline.report.render` turns them into HTML and Markdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Union


@dataclass(frozen=True)
class Table:
    """A table: ``columns`` headers and ``rows`` of already formatted cells."""

    caption: str
    columns: list[str]
    rows: list[list[str]]
    name: str = ""


@dataclass(frozen=True)
class Figure:
    """A PNG figure; ``name`` is its file name in the Markdown twin's ``figures/`` folder."""

    caption: str
    png: bytes
    name: str


@dataclass(frozen=True)
class Text:
    """A paragraph; ``kind`` "note" (a caveat) and "missing" (an absent input) render as highlighted boxes."""

    text: str
    kind: str = "p"


Block = Union[Table, Figure, Text]


@dataclass
class Section:
    """A titled part of the page."""

    title: str
    blocks: list[Block] = field(default_factory=list)


def fmt(value: Any, std: Any = None, decimals: int = 2) -> str:
    """``12.34`` or ``12.34(0.56)`` as MultiGen prints it; "—" for a missing or non-finite value."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    text = f"{value:.{decimals}f}"
    if isinstance(std, (int, float)) and not isinstance(std, bool) and math.isfinite(std):
        text += f"({std:.{decimals}f})"
    return text


def provenance_table(caption: str, metrics: Mapping[str, Mapping[str, Any]], shown: Iterable[str]) -> Table:
    """What each model's numbers were computed over: every metrics key not shown in the results table."""
    shown = set(shown)
    rows = []
    for model, values in metrics.items():
        extra = {k: v for k, v in sorted(values.items()) if k not in shown and not isinstance(v, (dict, list))}
        rows.append([model, "; ".join(f"{k} = {v}" for k, v in extra.items()) or "—"])
    return Table(caption, ["Model", "Computed over"], rows)


def missing(what: str, path: str, stage: str) -> Text:
    """The note shown where an input of the report does not exist yet."""
    return Text(f"{what}: not available — {path} is absent (produced by stage `{stage}`; run "
                f"`dvc repro {stage}`).", kind="missing")
