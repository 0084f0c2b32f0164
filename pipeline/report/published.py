"""The published numbers (``data/published.yaml``): loading, citing them, and the columns only they have."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.config import InputDataError, MissingInputError
from pipeline.report.blocks import Table, Text, fmt

PUBLISHED_ONLY = (("fid_coco", "FID (COCO) ↓"), ("fid_flickr30k", "FID (Flickr30K) ↓"),
                  ("latency_s", "Latency, s ↓"))


def load_published(path: str | Path) -> dict[str, Any]:
    """``data/published.yaml`` with its parts (``multigen``, ``visor``, ``piebench``, ``study``) checked."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: published numbers not found; set report.published in params.yaml to "
                                f"the project's data/published.yaml (or a copy in its layout)")
    data = yaml.safe_load(path.read_text())
    for part in ("multigen", "visor", "piebench", "study"):
        if not isinstance(data, dict) or part not in data:
            raise InputDataError(f"{path}: missing '{part}'; see the file's header for its layout")
    for part in ("multigen", "visor", "piebench"):
        if not data[part].get("rows") or not data[part].get("source"):
            raise InputDataError(f"{path}: '{part}' needs 'source' and 'rows'")
    if not isinstance(data["study"], dict) or not data["study"].get("note"):
        raise InputDataError(f"{path}: 'study' needs a 'note'")
    return data


def source_label(source: Mapping[str, str]) -> str:
    """The short label of published rows in a table's Source column: ``published (<repository>)``."""
    return f"published ({source['repository']})"


def citation(source: Mapping[str, str]) -> Text:
    """The full citation of a table's published rows: repository, file and commit."""
    return Text(f"Published rows: {source['repository']}, file {source['file']}, commit {source['commit']}.")


def published_only_table(published: Mapping[str, Any], decimals: int = 2) -> Table:
    """The TokenCompose README's photorealism and efficiency columns, which this pipeline does not compute."""
    rows = [[r["method"], *[fmt(r.get(key), r.get(f"{key}_std"), decimals) for key, _ in PUBLISHED_ONLY]]
            for r in published["rows"]]
    caption = ("Photorealism and efficiency, published only: this pipeline computes neither FID (it needs the "
               "COCO and Flickr30K reference images and an Inception network) nor a latency comparable with the "
               "original's GPU; — where the README prints none")
    return Table(caption, ["Method", *[h for _, h in PUBLISHED_ONLY]], rows, name="multigen_published_only")
