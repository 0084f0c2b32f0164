"""Where the ``prompts`` stage takes the MultiGen sets from: seeded generation (demo) or the official files,
fetched and checked against their SHA-256 (paper)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from pipeline.config import ConfigError, InputDataError
from pipeline.datasets.categories import load_categories
from pipeline.datasets.multigen_files import (NUM_OBJECTS, BenchmarkFormatError, multigen_text, validate_multigen,
                                              write_multigen)
from pipeline.fetch import read_verified
from pipeline.seeding import python_rng
from pipeline.store.files import atomic_write


@dataclass(frozen=True)
class PromptFile:
    """Where an official prompt file comes from: ``url`` (http(s):// or file://) or a local path."""

    url: str
    sha256: str


@dataclass(frozen=True)
class PromptsScale:
    """``profiles.<p>.prompts``: generate seeded sets (demo) or fetch the official files (paper)."""

    source: Literal["generate", "official"]
    files: dict[str, PromptFile] | None = None  # per set name (coco, ade20k) when source is official


def generate_multigen(categories: Sequence[str], num_prompts: int, seed: int, set_name: str) -> list[dict[str, Any]]:
    """``num_prompts`` MultiGen entries; prompt i draws 5 distinct names with ``python_rng(seed, "multigen", set_name, i)``."""
    if len(set(categories)) < NUM_OBJECTS:
        raise InputDataError(f"{set_name}: need at least {NUM_OBJECTS} distinct categories, got {len(set(categories))}")
    entries = []
    for index in range(num_prompts):
        objects = python_rng(seed, "multigen", set_name, index).sample(list(categories), NUM_OBJECTS)
        entry: dict[str, Any] = {"unique_id": index, "num_objects": NUM_OBJECTS}
        entry.update({f"obj_{i + 1}_attributes": [o] for i, o in enumerate(objects)})
        entry["text"] = multigen_text(objects)
        entries.append(entry)
    return entries


def prepare_multigen_set(cfg: PromptsScale, name: str, seed: int, num_prompts: int, dest: Path) -> list[dict[str, Any]]:
    """Write MultiGen set ``name`` to ``dest``: generated (seeded) or the verified official file.

    The official file is written byte for byte, after its hash and its format have been checked.
    """
    categories = load_categories(name)
    if cfg.source == "generate":
        entries = generate_multigen(categories, num_prompts, seed, name)
        write_multigen(entries, dest)
        return entries
    if not cfg.files or name not in cfg.files:
        raise ConfigError(f"profiles.<p>.prompts.files.{name}: missing; give the official file's url and sha256 in "
                          f"params.yaml (or set profiles.<p>.prompts.source: generate)")
    spec = cfg.files[name]
    data = read_verified(spec.url, spec.sha256)
    try:
        parsed = json.loads(data)
    except json.JSONDecodeError as err:
        raise BenchmarkFormatError(f"{spec.url}: not valid JSON ({err})") from err
    entries = validate_multigen(parsed, spec.url, categories=categories)
    atomic_write(Path(dest), data)
    return entries
