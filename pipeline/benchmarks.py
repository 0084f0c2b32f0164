"""Benchmark file formats: MultiGen prompt sets (SPEC §3.1) and PIE-Bench (SPEC §5.1-5.3).

MultiGen: a JSON list of prompts ``{"unique_id", "num_objects", "obj_1_attributes" ... "obj_5_attributes",
"text"}`` built on the template ``a photo of a {o1}, a {o2}, a {o3}, a {o4}, and a {o5}.`` with five
distinct class names from the COCO (80) or ADE20K (100) lists in ``data/categories/``. This module
generates seeded sets in that format, reads and validates the official files, and fetches them with a
SHA-256 check.

PIE-Bench: ``mapping_file.json`` (a dict keyed by 12-digit image id) beside ``annotation_images/``; masks
are run-length encoded as a flat list ``[start, length, start, length, ...]`` of absolute row-major
indices into a 512x512 grid, decoded with overflow clamped and the image border forced to 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

from pipeline.config import ConfigError, InputDataError, MissingInputError, Pixels, StageError
from pipeline.fetch import read_source
from pipeline.seeding import python_rng

log = logging.getLogger(__name__)

CATEGORIES_DIR = Path(__file__).resolve().parents[1] / "data" / "categories"
MULTIGEN_SETS = ("coco", "ade20k")
OFFICIAL_FILES = {"coco": "coco_obj_comp_5_1k.json", "ade20k": "ade20k_obj_comp_5_1k.json"}
NUM_OBJECTS = 5
MULTIGEN_FIELDS = ("unique_id", "num_objects", *(f"obj_{i}_attributes" for i in range(1, 6)), "text")


class BenchmarkFormatError(StageError, ValueError):
    """A benchmark file does not follow its format; the message names the file, entry and field."""


class HashMismatchError(StageError, ValueError):
    """A fetched file's SHA-256 differs from the one in params."""


# --- MultiGen --------------------------------------------------------------------------------------

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


def load_categories(name: str, directory: Path = CATEGORIES_DIR) -> list[str]:
    """The class names of MultiGen set ``name`` ("coco" or "ade20k"), one per line of its list file."""
    path = Path(directory) / f"{name}.txt"
    if not path.is_file():
        raise MissingInputError(f"{path}: category list not found; known sets: {', '.join(MULTIGEN_SETS)}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise BenchmarkFormatError(f"{path}: duplicate class names")
    return names


def multigen_text(objects: Sequence[str]) -> str:
    """The MultiGen prompt for five names: ``a photo of a A, a B, a C, a D, and a E.`` (always "a")."""
    if len(objects) != NUM_OBJECTS:
        raise InputDataError(f"MultiGen prompts name {NUM_OBJECTS} objects, got {len(objects)}: {objects}")
    *head, last = objects
    return "a photo of " + "".join(f"a {o}, " for o in head) + f"and a {last}."


def prompt_objects(entry: dict[str, Any]) -> list[str]:
    """The five object names of a MultiGen entry, in prompt order."""
    return [entry[f"obj_{i}_attributes"][0] for i in range(1, entry["num_objects"] + 1)]


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
    _atomic_write(Path(path), multigen_json(entries))


# --- fetching with a hash check --------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_verified(source: str, sha256: str) -> bytes:
    """Bytes of ``source`` (URL or path) after checking their SHA-256 against ``sha256``."""
    data = read_source(source)
    got = sha256_bytes(data)
    if got != sha256.lower():
        raise HashMismatchError(
            f"{source}: SHA-256 mismatch: expected {sha256.lower()}, got {got}; the file changed or is not the "
            f"one the params name (fix the url or the sha256 in params.yaml)")
    return data


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
    _atomic_write(Path(dest), data)
    return entries


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- PIE-Bench -------------------------------------------------------------------------------------

PIE_SIZE = 512
EDITING_TYPES: dict[str, tuple[str, str]] = {  # editing_type_id -> (annotation_images folder, description)
    "0": ("0_random_140", "random editing"),
    "1": ("1_change_object_80", "change object"),
    "2": ("2_add_object_80", "add object"),
    "3": ("3_delete_object_80", "delete object"),
    "4": ("4_change_attribute_content_40", "change content"),
    "5": ("5_change_attribute_pose_40", "change pose"),
    "6": ("6_change_attribute_color_40", "change color"),
    "7": ("7_change_attribute_material_40", "change material"),
    "8": ("8_change_background_80", "change background"),
    "9": ("9_change_style_80", "change style"),
}
MAPPING_FILE = "mapping_file.json"
IMAGES_DIR = "annotation_images"
PIEBENCH_HELP = (
    "PIE-Bench is distributed by its authors through a form linked from the PnPInversion README "
    "(https://github.com/cure-lab/PnPInversion#benchmark-download, form https://forms.gle/hVMkTABb4uvZVjme9); "
    "unpack it so that <root>/mapping_file.json and <root>/annotation_images/ exist and set "
    "profiles.paper.edit_data.root to <root>"
)


@dataclass(frozen=True)
class EditDataScale:
    """``profiles.<p>.edit_data``: the demo editing set or a local PIE-Bench copy at ``root``."""

    source: Literal["demo", "piebench"]
    size: Pixels = PIE_SIZE  # image side of the demo set (PIE-Bench itself is 512)
    root: str = ""  # PIE-Bench folder (mapping_file.json + annotation_images/) when source is piebench


@dataclass(frozen=True)
class PieBenchEntry:
    """One ``mapping_file.json`` value (SPEC §5.2); ``mask`` is the flat [start, length, ...] list."""

    image_path: str
    original_prompt: str
    editing_prompt: str
    editing_instruction: str
    editing_type_id: str
    blended_word: str
    mask: list[int]


def strip_brackets(prompt: str) -> str:
    """The prompt with every ``[`` and ``]`` removed, as every PIE-Bench consumer uses it."""
    return prompt.replace("[", "").replace("]", "")


def bracketed_words(prompt: str) -> list[str]:
    """The bracketed spans of a prompt (the words that differ between source and target), in order."""
    return re.findall(r"\[([^\[\]]*)\]", prompt)


def split_blended_word(value: str) -> tuple[str, str] | None:
    """``"cat dog"`` -> ("cat", "dog"); ``""`` -> None. Split on single spaces; elements 0 and 1 are used."""
    if value == "":
        return None
    parts = value.split(" ")
    if len(parts) < 2:
        raise BenchmarkFormatError(f"blended_word {value!r}: expected '<source word> <target word>' or ''")
    return parts[0], parts[1]


def encode_mask(mask: np.ndarray) -> list[int]:
    """Run-length encode an (H, W) binary mask row-major as ``[start, length, start, length, ...]``.

    Starts are absolute flat indices (row * W + col) of each run of ones.
    """
    flat = np.asarray(mask, dtype=bool).reshape(-1).astype(np.int8)
    edges = np.diff(np.concatenate([[0], flat, [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return np.stack([starts, ends - starts], axis=1).reshape(-1).astype(int).tolist()


def decode_mask(rle: Sequence[int], size: int = PIE_SIZE, force_border: bool = True) -> np.ndarray:
    """Decode a PIE-Bench RLE into a (size, size) uint8 mask (SPEC §5.3).

    Each pair (start, length) sets ``start .. start + min(length, size² - start) - 1``; the flat vector is
    reshaped row-major; with ``force_border`` the first/last row and column are set to 1.
    """
    if len(rle) % 2:
        raise BenchmarkFormatError(f"mask RLE has odd length {len(rle)}; expected [start, length, ...] pairs")
    total = size * size
    pairs = np.asarray(rle, dtype=np.int64).reshape(-1, 2)
    if (pairs[:, 0] < 0).any():
        raise BenchmarkFormatError("mask RLE has a negative start")
    starts = pairs[:, 0]
    ends = starts + np.minimum(pairs[:, 1], total - starts)
    keep = ends > starts
    delta = np.zeros(total + 1, dtype=np.int64)
    np.add.at(delta, starts[keep], 1)
    np.add.at(delta, ends[keep], -1)
    mask = (np.cumsum(delta[:-1]) > 0).astype(np.uint8).reshape(size, size)
    if force_border:
        mask[[0, -1], :] = 1
        mask[:, [0, -1]] = 1
    return mask


def parse_entry(key: str, value: Any, source: str) -> PieBenchEntry:
    """Validate one mapping entry; errors name the file, the image id and the field."""
    where = f"{source}: entry {key!r}"
    if not (isinstance(key, str) and len(key) == 12 and key.isdigit()):
        raise BenchmarkFormatError(f"{where}: image id must be a 12-digit string")
    if not isinstance(value, dict):
        raise BenchmarkFormatError(f"{where}: expected an object, got {type(value).__name__}")
    fields = PieBenchEntry.__dataclass_fields__
    for name in fields:
        if name not in value:
            raise BenchmarkFormatError(f"{where}: missing field {name!r}")
        expected = list if name == "mask" else str
        if not isinstance(value[name], expected):
            raise BenchmarkFormatError(f"{where}: field {name!r} must be a {expected.__name__}, got {value[name]!r:.60}")
    if value["editing_type_id"] not in EDITING_TYPES:
        raise BenchmarkFormatError(f"{where}: field 'editing_type_id' is {value['editing_type_id']!r}, expected '0'..'9'")
    mask = value["mask"]
    if len(mask) % 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in mask):
        raise BenchmarkFormatError(f"{where}: field 'mask' must be pairs of non-negative ints [start, length, ...]")
    try:
        split_blended_word(value["blended_word"])
    except BenchmarkFormatError as err:
        raise BenchmarkFormatError(f"{where}: field {err}") from None
    return PieBenchEntry(**{name: value[name] for name in fields})


def read_mapping(path: Path) -> dict[str, PieBenchEntry]:
    """Read and validate a ``mapping_file.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BenchmarkFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not data:
        raise BenchmarkFormatError(f"{path}: expected a non-empty JSON object keyed by image id")
    return {key: parse_entry(key, value, str(path)) for key, value in data.items()}


def write_mapping(path: Path, entries: dict[str, PieBenchEntry]) -> None:
    """Write ``mapping_file.json`` (atomic)."""
    _atomic_write(Path(path), json.dumps({k: asdict(v) for k, v in entries.items()}).encode("utf-8"))


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, every pixel decoded (``verify`` misses a truncated JPEG); an
    unreadable one is an error naming it and the fix."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BenchmarkFormatError(f"{path}: not a readable image ({err}); replace it with the file from "
                                   f"PIE-Bench. {PIEBENCH_HELP}") from err


def validate_piebench_root(root: Path) -> dict[str, PieBenchEntry]:
    """Check a PIE-Bench folder: mapping file valid and every image present; return its entries."""
    root = Path(root)
    for needed in (root, root / MAPPING_FILE, root / IMAGES_DIR):
        if not needed.exists():
            raise MissingInputError(f"{needed}: not found. {PIEBENCH_HELP}")
    entries = read_mapping(root / MAPPING_FILE)
    missing = [e.image_path for e in entries.values() if not (root / IMAGES_DIR / e.image_path).is_file()]
    if missing:
        raise MissingInputError(
            f"{root / IMAGES_DIR}: {len(missing)} of {len(entries)} images named in {MAPPING_FILE} are missing "
            f"(first: {missing[:3]}). {PIEBENCH_HELP}")
    sizes = {e.image_path: _image_size(root / IMAGES_DIR / e.image_path) for e in entries.values()}
    wrong = {path: size for path, size in sizes.items() if size != (PIE_SIZE, PIE_SIZE)}
    if wrong:
        first = next(iter(wrong.items()))
        raise BenchmarkFormatError(f"{root / IMAGES_DIR}: {len(wrong)} images are not {PIE_SIZE}x{PIE_SIZE} "
                                   f"(first: {first[0]} is {first[1][0]}x{first[1][1]}); the masks' RLE addresses "
                                   f"the original {PIE_SIZE}x{PIE_SIZE} images: use those, not a resized copy")
    return entries


def load_example(root: str | Path, entry: PieBenchEntry) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 source and (H, W) uint8 mask (1 = edit, forced border) of a PIE-Bench entry."""
    path = Path(root) / IMAGES_DIR / entry.image_path
    image = np.asarray(Image.open(path).convert("RGB"))
    if image.shape[0] != image.shape[1]:
        raise BenchmarkFormatError(f"{path}: image is {image.shape[1]}x{image.shape[0]}; PIE-Bench masks live on "
                                   f"a square grid (512x512): resize the image to a square")
    starts = entry.mask[0::2]
    if starts and max(starts) >= image.shape[0] ** 2:
        raise BenchmarkFormatError(f"{path}: its mask RLE addresses pixels past a {image.shape[0]}x{image.shape[0]} "
                                   f"grid; PIE-Bench masks are encoded on the original 512x512 images: use those, "
                                   f"not a resized copy")
    return image, decode_mask(entry.mask, size=image.shape[0])


def copy_piebench(root: Path, out_dir: Path) -> dict[str, PieBenchEntry]:
    """Validate the PIE-Bench copy at ``root`` and copy its mapping file and images into ``out_dir``."""
    entries = validate_piebench_root(root)
    out_dir = Path(out_dir)
    for entry in entries.values():
        dest = out_dir / IMAGES_DIR / entry.image_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(root) / IMAGES_DIR / entry.image_path, dest)
    shutil.copyfile(Path(root) / MAPPING_FILE, out_dir / MAPPING_FILE)
    log.info("copied %d PIE-Bench images from %s to %s", len(entries), root, out_dir)
    return entries


def piebench_summary(entries: dict[str, PieBenchEntry], size: int = PIE_SIZE) -> dict[str, Any]:
    """Flat counts for a metrics file: entries, per editing type, blended words, mean mask fraction."""
    summary: dict[str, Any] = {"entries": len(entries), "image_size": size}
    for type_id in EDITING_TYPES:
        summary[f"type_{type_id}"] = sum(e.editing_type_id == type_id for e in entries.values())
    summary["with_blended_word"] = sum(bool(e.blended_word) for e in entries.values())
    fractions = [decode_mask(e.mask, size).mean() for e in entries.values()]
    summary["mean_mask_fraction"] = round(float(np.mean(fractions)), 6) if fractions else 0.0
    return summary
