"""TokenCompose's ``metadata.jsonl`` (SPEC §2.7): one JSON object per line with ``file_name``, ``text`` (the
caption) and ``attn_list`` = ``[[phrase, mask path or null], ...]``.

Every user of the file (the COCO training set, the authors' phrases, the authors' masks) reads it with
:func:`read_records`, so a malformed line is reported the same way whichever stage meets it first;
:func:`read_tokencompose_metadata` reads and checks it from a path or URL in one call, after checking the
file's SHA-256 when params pin one (:data:`TOKENCOMPOSE_METADATA_SHA256` is that of the file at
:data:`TOKENCOMPOSE_METADATA_URL`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import StageError
from pipeline.fetch import read_pinned

TOKENCOMPOSE_METADATA_URL = (
    "https://raw.githubusercontent.com/mlpc-ucsd/TokenCompose/5633f816116fdf7de74d9055ff9666c5222416e2/"
    "train/data/coco_gsam_img/train/metadata.jsonl"
)
# SHA-256 of that file: 1,389,821 bytes, git blob 748167af338493b52cf0554b82fe3b721938dde8 (what `git ls-tree
# 5633f81 train/data/coco_gsam_img/train/` lists in a clone of TokenCompose)
TOKENCOMPOSE_METADATA_SHA256 = "6796a8a2b7380973e53e758d6e8bf620a825a918a00a4564e841d7df115f2506"


class MetadataError(StageError, ValueError):
    """A metadata file is missing, unreadable or has a malformed line (named in the message)."""


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is a well-formed metadata record, else :class:`MetadataError` naming ``where``."""
    if not isinstance(record, dict):
        raise MetadataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("file_name", "text", "attn_list"):
        if key not in record:
            raise MetadataError(f"{where}: missing key {key!r} (expected file_name, text, attn_list)")
    if not isinstance(record["file_name"], str) or not record["file_name"].strip():
        raise MetadataError(f"{where}: file_name must be a non-empty string")
    if isinstance(record["text"], list):
        raise MetadataError(f"{where}: text is a list of captions; the original picks one with CLIP "
                            f"ViT-L/14@336 (SPEC §2.2), which is not re-run here: give the chosen caption")
    if not isinstance(record["text"], str):
        raise MetadataError(f"{where}: text must be a string")
    pairs = record["attn_list"]
    ok = isinstance(pairs, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and (p[1] is None or isinstance(p[1], str))
        for p in pairs
    )
    if not ok:
        raise MetadataError(f"{where}: attn_list must be a list of [phrase, mask path or null] pairs")
    return record


def _parse_line(line: str, where: str) -> dict[str, Any]:
    """The checked record on one line; :class:`MetadataError` naming ``where`` when it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise MetadataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
    except ValueError as err:  # JSON that Python refuses, e.g. an integer of over 4300 digits
        raise MetadataError(f"{where}: unreadable JSON ({err})") from err
    return check_record(record, where)


def read_records(text: str, source: str, keep_bad: bool = False) -> list[dict[str, Any]]:
    """Records of a ``metadata.jsonl`` text, in file order; blank lines skipped.

    A malformed line raises :class:`MetadataError` naming ``source:line``; with ``keep_bad`` it becomes
    ``{"bad_line": n, "error": message}`` in its place instead (a stage that records per-line failures).
    A text without any record (empty, or blank lines only) raises either way.
    """
    out: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(_parse_line(line, f"{source}:{number}"))
        except MetadataError as err:
            if not keep_bad:
                raise
            out.append({"bad_line": number, "error": str(err)})
    if not out:
        raise MetadataError(f"{source}: no records")
    return out


def read_metadata_text(source: str | Path, retries: int = 3, timeout: float = 30.0, sha256: str | None = None,
                       param: str = "the metadata's sha256 param") -> str:
    """Text of a metadata file at a local path or a URL (UTF-8); a :class:`MetadataError` when unreadable.

    With ``sha256`` the bytes must have that SHA-256, else :class:`~pipeline.fetch.HashMismatchError` naming
    ``param`` (the params key that pins it); ``None`` reads the file unchecked.
    """
    try:
        return read_pinned(source, sha256, retries, timeout, param).decode("utf-8")
    except FileNotFoundError as err:
        raise MetadataError(f"{source}: metadata file not found; give a path or an http(s) URL") from err
    except OSError as err:
        raise MetadataError(str(err)) from err


def read_tokencompose_metadata(path: str | Path, retries: int = 3, timeout: float = 30.0, sha256: str | None = None,
                               param: str = "the metadata's sha256 param") -> list[dict[str, Any]]:
    """TokenCompose's ``metadata.jsonl`` (SPEC §2.7) from a path or URL: a list of checked records.

    Each record is ``{"file_name": str, "text": str, "attn_list": [[phrase, mask path | None], ...]}``.
    ``sha256`` (optional) is checked first (:func:`read_metadata_text`). Raises :class:`MetadataError`
    naming the file and line of a malformed record.
    """
    return read_records(read_metadata_text(path, retries, timeout, sha256, param), str(path))


def image_id_of(file_name: str) -> str:
    """``"000000000142.jpg"`` -> ``"000000000142"`` (SPEC §2.7's ``img_id``)."""
    return Path(file_name).stem
