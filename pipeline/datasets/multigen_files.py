"""MultiGen prompt files (SPEC §3.1): the format, its validation, and the prompt sets the evaluation stages read.

A JSON list of prompts ``{"unique_id", "num_objects", "obj_1_attributes" ... "obj_5_attributes", "text"}`` built on
the template ``a photo of a {o1}, a {o2}, a {o3}, a {o4}, and a {o5}.`` with five distinct class names from
the COCO (80) or ADE20K (100) lists in ``data/categories/``. The ``prompts`` stage writes one file per set
to :data:`PROMPTS_DIR`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.config import InputDataError, MissingInputError
from pipeline.store.files import atomic_write

PROMPTS_DIR = Path("artifacts/data/multigen")  # the prompts stage's output: <set>.json per prompt set


MULTIGEN_SETS = ("coco", "ade20k")


OFFICIAL_FILES = {"coco": "coco_obj_comp_5_1k.json", "ade20k": "ade20k_obj_comp_5_1k.json"}


NUM_OBJECTS = 5


MULTIGEN_FIELDS = ("unique_id", "num_objects", *(f"obj_{i}_attributes" for i in range(1, 6)), "text")


class BenchmarkFormatError(InputDataError):
    """A benchmark file does not follow its format; the message names the file, entry and field."""


def multigen_text(objects: Sequence[str]) -> str:
    """The MultiGen prompt for five names: ``a photo of a A, a B, a C, a D, and a E.`` (always "a")."""
    if len(objects) != NUM_OBJECTS:
        raise InputDataError(f"MultiGen prompts name {NUM_OBJECTS} objects, got {len(objects)}: {objects}")
    *head, last = objects
    return "a photo of " + "".join(f"a {o}, " for o in head) + f"and a {last}."


def prompt_objects(entry: dict[str, Any]) -> list[str]:
    """The five object names of a MultiGen entry, in prompt order."""
    return [entry[f"obj_{i}_attributes"][0] for i in range(1, entry["num_objects"] + 1)]


def _check_entry(entry: Any, index: int, source: str, check_template: bool) -> None:
    where = f"{source}: entry {index}"
    if not isinstance(entry, dict):
        raise BenchmarkFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [f for f in MULTIGEN_FIELDS if f not in entry]
    if missing:
        raise BenchmarkFormatError(f"{where}: missing field {missing[0]!r} (fields: {', '.join(MULTIGEN_FIELDS)})")
    if entry["unique_id"] != index:
        raise BenchmarkFormatError(f"{where}: field 'unique_id' is {entry['unique_id']!r}, expected {index} (== index)")
    if entry["num_objects"] != NUM_OBJECTS:
        raise BenchmarkFormatError(f"{where}: field 'num_objects' is {entry['num_objects']!r}, expected {NUM_OBJECTS}")
    for i in range(1, NUM_OBJECTS + 1):
        attrs = entry[f"obj_{i}_attributes"]
        if not (isinstance(attrs, list) and attrs and all(isinstance(a, str) and a for a in attrs)):
            raise BenchmarkFormatError(f"{where}: field 'obj_{i}_attributes' must be a non-empty list of names, got {attrs!r}")
    objects = prompt_objects(entry)
    if len(set(objects)) != NUM_OBJECTS:
        raise BenchmarkFormatError(f"{where}: objects are not distinct: {objects}")
    if not isinstance(entry["text"], str):
        raise BenchmarkFormatError(f"{where}: field 'text' must be a string")
    if check_template and entry["text"] != multigen_text(objects):
        raise BenchmarkFormatError(
            f"{where}: field 'text' {entry['text']!r} does not follow the template; expected {multigen_text(objects)!r}")


def validate_multigen(data: Any, source: str, check_template: bool = True,
                      categories: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Check a parsed MultiGen file (a list of entries) and return it; errors name the entry and field.

    With ``categories``, every object name must be one of them.
    """
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{source}: expected a JSON list of prompts, got {type(data).__name__}")
    if not data:
        raise BenchmarkFormatError(f"{source}: no prompts")
    known = set(categories) if categories is not None else None
    for index, entry in enumerate(data):
        _check_entry(entry, index, source, check_template)
        unknown = [o for o in prompt_objects(entry) if known is not None and o not in known]
        if unknown:
            raise BenchmarkFormatError(f"{source}: entry {index}: object {unknown[0]!r} is not in the category list")
    return data


def read_multigen(path: Path, check_template: bool = True) -> list[dict[str, Any]]:
    """Read and validate a MultiGen prompt file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BenchmarkFormatError(f"{path}: not valid JSON ({err})") from err
    return validate_multigen(data, str(path), check_template)


def multigen_json(entries: list[dict[str, Any]]) -> bytes:
    """Serialise entries exactly as the official files are written (``json.dumps(indent=4)``)."""
    return json.dumps(entries, indent=4).encode("utf-8")


def write_multigen(entries: list[dict[str, Any]], path: Path) -> None:
    """Write a MultiGen prompt file (atomic)."""
    atomic_write(Path(path), multigen_json(entries))


@dataclass(frozen=True)
class MultiGenPrompt:
    """One MultiGen prompt: its id (== list index), text and object names in prompt order."""

    prompt_id: int
    text: str
    objects: tuple[str, ...]


def load_prompt_set(path: str | Path, max_prompts: int | None = None) -> list[MultiGenPrompt]:
    """Read an official-format MultiGen prompt file (validated by :func:`read_multigen`).

    Returns the first ``max_prompts`` prompts (all when None), ``prompt_id`` = ``unique_id``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: MultiGen prompt file not found; run `dvc repro prompts`")
    entries = read_multigen(path, check_template=False)
    prompts = [MultiGenPrompt(e["unique_id"], e["text"], tuple(prompt_objects(e))) for e in entries]
    return prompts[:max_prompts] if max_prompts is not None else prompts
