"""PIE-Bench files (SPEC §5.1-5.3): ``mapping_file.json`` (a dict keyed by 12-digit image id) beside
``annotation_images/``. Masks are run-length encoded as a flat list ``[start, length, start, length, ...]``
of absolute row-major indices into a 512x512 grid, decoded with overflow clamped and the image border
forced to 1."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

from pipeline.config import InputDataError, MissingInputError, Pixels
from pipeline.safe_paths import PATH_RULES, UnsafePathError, inside
from pipeline.store.files import atomic_write

log = logging.getLogger(__name__)


class PieBenchFormatError(InputDataError):
    """A PIE-Bench file does not follow its format; the message names the file, entry and field."""


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
        raise PieBenchFormatError(f"blended_word {value!r}: expected '<source word> <target word>' or ''")
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
        raise PieBenchFormatError(f"mask RLE has odd length {len(rle)}; expected [start, length, ...] pairs")
    total = size * size
    pairs = np.asarray(rle, dtype=np.int64).reshape(-1, 2)
    if (pairs[:, 0] < 0).any():
        raise PieBenchFormatError("mask RLE has a negative start")
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
        raise PieBenchFormatError(f"{where}: image id must be a 12-digit string")
    if not isinstance(value, dict):
        raise PieBenchFormatError(f"{where}: expected an object, got {type(value).__name__}")
    fields = PieBenchEntry.__dataclass_fields__
    for name in fields:
        if name not in value:
            raise PieBenchFormatError(f"{where}: missing field {name!r}")
        expected = list if name == "mask" else str
        if not isinstance(value[name], expected):
            raise PieBenchFormatError(f"{where}: field {name!r} must be a {expected.__name__}, got {value[name]!r:.60}")
    if value["editing_type_id"] not in EDITING_TYPES:
        raise PieBenchFormatError(f"{where}: field 'editing_type_id' is {value['editing_type_id']!r}, expected '0'..'9'")
    mask = value["mask"]
    if len(mask) % 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in mask):
        raise PieBenchFormatError(f"{where}: field 'mask' must be pairs of non-negative ints [start, length, ...]")
    try:
        split_blended_word(value["blended_word"])
    except PieBenchFormatError as err:
        raise PieBenchFormatError(f"{where}: field {err}") from None
    return PieBenchEntry(**{name: value[name] for name in fields})


def read_mapping(path: Path) -> dict[str, PieBenchEntry]:
    """Read and validate a ``mapping_file.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PieBenchFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not data:
        raise PieBenchFormatError(f"{path}: expected a non-empty JSON object keyed by image id")
    return {key: parse_entry(key, value, str(path)) for key, value in data.items()}


def write_mapping(path: Path, entries: dict[str, PieBenchEntry]) -> None:
    """Write ``mapping_file.json`` (atomic)."""
    atomic_write(Path(path), json.dumps({k: asdict(v) for k, v in entries.items()}).encode("utf-8"))


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, every pixel decoded (``verify`` misses a truncated JPEG); an
    unreadable one is an error naming it and the fix."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise PieBenchFormatError(f"{path}: not a readable image ({err}); replace it with the file from "
                                   f"PIE-Bench. {PIEBENCH_HELP}") from err


# Why an entry is left out of the copy (``copy_piebench``): the path rules of :mod:`pipeline.safe_paths` and a
# mask whose RLE starts past the 512x512 frame (``load_example`` would refuse it in the edit stage).
MASK_OUT_OF_FRAME = "mask_out_of_frame"
REJECT_REASONS = (*PATH_RULES, MASK_OUT_OF_FRAME)


def image_file(root: str | Path, entry: PieBenchEntry, image_id: str = "") -> Path:
    """The resolved image file of ``entry`` under ``<root>/annotation_images``; an ``image_path`` that leaves
    that folder (absolute, ``..``, a symbolic link out) raises :class:`~pipeline.safe_paths.UnsafePathError`."""
    where = f"{MAPPING_FILE}: entry {image_id!r} image_path" if image_id else f"{MAPPING_FILE}: image_path"
    return inside(Path(root) / IMAGES_DIR, entry.image_path, where)


def mask_in_frame(entry: PieBenchEntry, size: int = PIE_SIZE) -> bool:
    """Whether every run of ``entry.mask`` starts inside the ``size`` x ``size`` grid (lengths past its end
    are clamped by :func:`decode_mask`, as the benchmark does)."""
    starts = entry.mask[0::2]
    return not starts or max(starts) < size * size


def safe_image_files(root: Path, entries: dict[str, PieBenchEntry]
                     ) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Split ``entries`` into image id -> resolved image file and the ``(image id, rule)`` pairs of the
    image paths that leave ``<root>/annotation_images`` (rules of :data:`~pipeline.safe_paths.PATH_RULES`)."""
    files: dict[str, Path] = {}
    rejected: list[tuple[str, str]] = []
    for image_id, entry in entries.items():
        try:
            files[image_id] = image_file(root, entry, image_id)
        except UnsafePathError as err:
            log.debug("%s", err)
            rejected.append((image_id, err.rule))
    return files, rejected


def _check_images(root: Path, entries: dict[str, PieBenchEntry], files: dict[str, Path]) -> None:
    """Raise when an image of ``files`` is missing, unreadable or not 512x512 (errors for the whole folder)."""
    missing = [entries[i].image_path for i, path in files.items() if not path.is_file()]
    if missing:
        raise MissingInputError(
            f"{root / IMAGES_DIR}: {len(missing)} of {len(entries)} images named in {MAPPING_FILE} are missing "
            f"(first: {missing[:3]}). {PIEBENCH_HELP}")
    sizes = {entries[i].image_path: _image_size(path) for i, path in files.items()}
    wrong = {path: size for path, size in sizes.items() if size != (PIE_SIZE, PIE_SIZE)}
    if wrong:
        first = next(iter(wrong.items()))
        raise PieBenchFormatError(f"{root / IMAGES_DIR}: {len(wrong)} images are not {PIE_SIZE}x{PIE_SIZE} "
                                   f"(first: {first[0]} is {first[1][0]}x{first[1][1]}); the masks' RLE addresses "
                                   f"the original {PIE_SIZE}x{PIE_SIZE} images: use those, not a resized copy")


def validate_piebench_root(root: Path) -> tuple[dict[str, PieBenchEntry], list[tuple[str, str]]]:
    """Check a PIE-Bench folder: mapping file valid, every image present and 512x512.

    Returns the usable entries and the ``(image id, reason)`` pairs of the entries left out, reasons from
    :data:`REJECT_REASONS`: an image path that leaves ``annotation_images/`` (never opened) or a mask RLE
    starting past the 512x512 frame. A missing, unreadable or resized image, or every entry left out, is an
    error for the whole folder.
    """
    root = Path(root)
    for needed in (root, root / MAPPING_FILE, root / IMAGES_DIR):
        if not needed.exists():
            raise MissingInputError(f"{needed}: not found. {PIEBENCH_HELP}")
    entries = read_mapping(root / MAPPING_FILE)
    files, rejected = safe_image_files(root, entries)
    _check_images(root, entries, files)
    for image_id in [i for i in files if not mask_in_frame(entries[i])]:
        log.debug("%s: entry %r: mask RLE starts past the %dx%d frame", MAPPING_FILE, image_id, PIE_SIZE, PIE_SIZE)
        rejected.append((image_id, MASK_OUT_OF_FRAME))
        del files[image_id]
    if not files:
        raise PieBenchFormatError(f"{root / MAPPING_FILE}: all {len(entries)} entries are unusable (first: "
                                  f"{rejected[:3]}); image paths must stay inside {root / IMAGES_DIR} and masks "
                                  f"inside the {PIE_SIZE}x{PIE_SIZE} frame. {PIEBENCH_HELP}")
    return {i: entries[i] for i in files}, rejected


def load_example(root: str | Path, entry: PieBenchEntry) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 source and (H, W) uint8 mask (1 = edit, forced border) of a PIE-Bench entry.

    An ``image_path`` leaving ``<root>/annotation_images`` raises
    :class:`~pipeline.safe_paths.UnsafePathError` (an :class:`InputDataError`) before any file is opened.
    """
    path = image_file(root, entry)
    image = np.asarray(Image.open(path).convert("RGB"))
    if image.shape[0] != image.shape[1]:
        raise PieBenchFormatError(f"{path}: image is {image.shape[1]}x{image.shape[0]}; PIE-Bench masks live on "
                                   f"a square grid (512x512): resize the image to a square")
    if not mask_in_frame(entry, image.shape[0]):
        raise PieBenchFormatError(f"{path}: its mask RLE addresses pixels past a {image.shape[0]}x{image.shape[0]} "
                                   f"grid; PIE-Bench masks are encoded on the original 512x512 images: use those, "
                                   f"not a resized copy")
    return image, decode_mask(entry.mask, size=image.shape[0])


def copy_piebench(root: Path, out_dir: Path) -> tuple[dict[str, PieBenchEntry], list[tuple[str, str]]]:
    """Validate the PIE-Bench copy at ``root`` and copy its usable entries into ``out_dir``.

    Returns the copied entries and the ``(image id, reason)`` pairs left out (:func:`validate_piebench_root`).
    Every file read lies inside ``<root>/annotation_images`` and every file written inside ``out_dir``. The
    mapping file is copied byte for byte when no entry is left out; otherwise without the left-out entries.
    """
    root, out_dir = Path(root), Path(out_dir)
    entries, rejected = validate_piebench_root(root)
    for image_id, entry in entries.items():
        dest = inside(out_dir / IMAGES_DIR, entry.image_path, f"{MAPPING_FILE}: entry {image_id!r} image_path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image_file(root, entry, image_id), dest)
    if rejected:
        raw = json.loads((root / MAPPING_FILE).read_text())
        atomic_write(out_dir / MAPPING_FILE, json.dumps({k: raw[k] for k in entries}).encode("utf-8"))
    else:
        shutil.copyfile(root / MAPPING_FILE, out_dir / MAPPING_FILE)
    log.info("copied %d PIE-Bench images from %s to %s (%d entries left out)", len(entries), root, out_dir,
             len(rejected))
    return entries, rejected


def rejected_summary(rejected: list[tuple[str, str]]) -> dict[str, int]:
    """Flat counts for a metrics file: ``bad_input`` (entries left out) and ``bad_input_<reason>`` for every
    reason of :data:`REJECT_REASONS` (zero included, so the keys do not depend on the data)."""
    counts = {f"bad_input_{reason}": 0 for reason in REJECT_REASONS}
    for _, reason in rejected:
        counts[f"bad_input_{reason}"] += 1
    return {"bad_input": len(rejected), **counts}


def piebench_summary(entries: dict[str, PieBenchEntry], size: int = PIE_SIZE) -> dict[str, Any]:
    """Flat counts for a metrics file: entries, per editing type, blended words, mean mask fraction."""
    summary: dict[str, Any] = {"entries": len(entries), "image_size": size}
    for type_id in EDITING_TYPES:
        summary[f"type_{type_id}"] = sum(e.editing_type_id == type_id for e in entries.values())
    summary["with_blended_word"] = sum(bool(e.blended_word) for e in entries.values())
    fractions = [decode_mask(e.mask, size).mean() for e in entries.values()]
    summary["mean_mask_fraction"] = round(float(np.mean(fractions)), 6) if fractions else 0.0
    return summary
