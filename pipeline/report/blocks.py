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


def no_negative_zero(text: str, signed: bool = False) -> str:
    """A number formatted as ``-0.00`` (a tiny negative value rounded to zero) without its minus sign:
    ``0.00``, or ``+0.00`` when ``signed``."""
    if text.startswith("-") and not text[1:].strip("0."):
        return ("+" if signed else "") + text[1:]
    return text


def fmt(value: Any, std: Any = None, decimals: int = 2) -> str:
    """``12.34`` or ``12.34(0.56)`` as MultiGen prints it; "—" for a missing or non-finite value."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    text = no_negative_zero(f"{value:.{decimals}f}")
    if isinstance(std, (int, float)) and not isinstance(std, bool) and math.isfinite(std):
        text += f"({std:.{decimals}f})"
    return text


def provenance_table(caption: str, metrics: Mapping[str, Mapping[str, Any]], shown: Iterable[str]) -> list[Table]:
    """What each model's numbers were computed over, as tables a person reads: the settings every model
    shares (setting | value), then the settings that differ (setting | one column per model). Keys already
    in the results table and nested values are left out; a model without a key shows "—"."""
    shown = set(shown)
    settings = {model: {k: v for k, v in values.items() if k not in shown and not isinstance(v, (dict, list))}
                for model, values in metrics.items()}
    keys = sorted({k for values in settings.values() for k in values})
    if not keys:
        return []
    models = list(settings)
    cells = {k: [_setting(settings[m].get(k, "—")) for m in models] for k in keys}
    shared = [[k, row[0]] for k, row in cells.items() if len(set(row)) == 1 and len(models) > 1]
    differ = [[k, *row] for k, row in cells.items() if len(set(row)) > 1 or len(models) == 1]
    tables = []
    if shared:
        tables.append(Table(f"{caption}: settings shared by every model", ["Setting", "Value"], shared))
    if differ:
        title = f"{caption}: settings that differ between models" if len(models) > 1 else caption
        tables.append(Table(title, ["Setting", *models], differ))
    return tables


def _setting(value: Any) -> str:
    """A provenance cell: empty strings as "—", everything else as written in the metrics file."""
    return "—" if value == "" or value is None else str(value)


def missing(what: str, path: str, stage: str) -> Text:
    """The note shown where an input of the report does not exist yet."""
    return Text(f"{what}: not available — {path} is absent (produced by stage `{stage}`; run "
                f"`dvc repro {stage}`).", kind="missing")
