"""The published numbers (``data/published.yaml``): loading them and citing them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.config import InputDataError, MissingInputError
from pipeline.report.blocks import Text

STUDY_TABLES = ("multigen", "piebench")  # the parts of ``study``: its Table 1 and Table 2


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
    _check_study(path, data["study"])
    return data


def _check_study(path: Path, study: Any) -> None:
    """The ``study`` part: a source (name, short, copied_from) and, per table, its name, note, caveat and rows."""
    source = study.get("source") if isinstance(study, dict) else None
    if not isinstance(source, dict) or not all(source.get(k) for k in ("name", "short", "copied_from")):
        raise InputDataError(f"{path}: 'study' needs a 'source' with 'name', 'short' and 'copied_from'")
    for part in STUDY_TABLES:
        table = study.get(part)
        if not isinstance(table, dict) or not all(table.get(k) for k in ("table", "note", "caveat", "rows")):
            raise InputDataError(f"{path}: 'study.{part}' needs 'table', 'note', 'caveat' and 'rows'")


def source_label(source: Mapping[str, str]) -> str:
    """The short label of published rows in a table's Source column: ``published (<repository>)``."""
    return f"published ({source['repository']})"


def citation(source: Mapping[str, str]) -> Text:
    """The full citation of a table's published rows: repository, file and commit."""
    return Text(f"Published rows: {source['repository']}, file {source['file']}, commit {source['commit']}.")


def study_label(study: Mapping[str, Any], part: str) -> str:
    """The Source column of the study's rows of ``part`` (``multigen`` or ``piebench``):
    ``published (<short>, <table>)``, e.g. ``published (reproduction study, Table 1)``."""
    return f"published ({study['source']['short']}, {study[part]['table']})"


def study_blocks(study: Mapping[str, Any], part: str) -> list[Text]:
    """What a section says of the study's rows of ``part``: their note, their caveat (highlighted) and their
    source, the study's report and the project's copy the numbers were taken from."""
    source = study["source"]
    return [Text(study[part]["note"]), Text(study[part]["caveat"], kind="note"),
            Text(f"Study rows: {source['name']}; copied from {source['copied_from']}.")]
