"""The ``masks`` stage's authors source (``masks.source: authors``): TokenCompose's released mask PNGs.

Each ``[word, path]`` of a metadata line's ``attn_list`` becomes one ``artifacts/masks`` row, the same
format as the Grounded-SAM rows (:mod:`pipeline.masks.grounded_sam`), so training reads one format; the
token indices come from ``artifacts/nouns``. Written in resumable shards, split by rank.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pipeline.config import MissingInputError
from pipeline.datasets.tokencompose_metadata import read_records
from pipeline.fetch import read_source
from pipeline.geometry import train_mask
from pipeline.masks.inputs import RunContext, read_nouns
from pipeline.masks.params import MasksScale
from pipeline.masks.rows import masks_row, phrase_entries
from pipeline.safe_paths import UnsafePathError, inside
from pipeline.store import shards
from pipeline.store.codecs import rle_encode
from pipeline.store.identity import code_digest, dir_files, files_digest, fingerprint_of
from pipeline.store.shards import STATUS_OK, write_shards


STATUS_UNSAFE_PATH = "unsafe_mask_path"


def authors_mask_path(path: str, masks_dir: Path) -> Path:
    """Where a metadata mask path (``seg/<id>/mask_<id>_<word>.png``) lies in the mask folder
    (``<masks_dir>/<id>/mask_<id>_<word>.png``, symbolic links resolved). Only a leading ``seg/`` is dropped
    (the original replaced every "seg" substring, SPEC §1.1 step 3). A path that leaves the folder (absolute,
    ``..``, a symbolic link out) raises :class:`~pipeline.safe_paths.UnsafePathError`."""
    parts = PurePosixPath(path).parts
    if parts and parts[0] == "seg":
        parts = parts[1:]
    relative = str(PurePosixPath(*parts)) if parts else ""
    return inside(masks_dir, relative, f"authors' metadata mask path {path!r}")


def phrase_mask(path: str, masks_dir: Path) -> tuple[np.ndarray | None, str, str]:
    """The mask of a metadata mask path, as :func:`read_authors_mask` gives it; an unsafe path is not read
    and gives status ``unsafe_mask_path``."""
    try:
        return read_authors_mask(authors_mask_path(path, masks_dir))
    except UnsafePathError as err:
        return None, STATUS_UNSAFE_PATH, str(err)


def read_authors_mask(path: Path) -> tuple[np.ndarray | None, str, str]:
    """A released mask PNG -> ((H, W) bool from channel 0 > 0, status, error) (SPEC §2.7: RGBA from
    ``plt.imsave``, white = object). All black -> ``blank_mask``: the file cannot tell an empty mask from one
    covering the whole image (SPEC §1.6 item 7), so it gives no supervision."""
    if not path.is_file():
        return None, "missing_mask_file", f"{path}: mask file not found; check masks.authors_masks"
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im)
    except Exception as err:  # noqa: BLE001 - PIL raises several types for bad files
        return None, "corrupt_mask", f"{path}: does not decode ({type(err).__name__}: {err})"
    mask = (pixels[..., 0] if pixels.ndim == 3 else pixels) > 0
    if not mask.any():
        return None, "blank_mask", f"{path}: all black (empty, or whole-image mask written black by plt.imsave)"
    return mask, STATUS_OK, ""


def _nouns_lookup(nouns: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[list[int], str, str]]]:
    """``{image_id: {phrase: (token_indices, phrase_status, phrase_error)}}`` (first occurrence wins)."""
    table: dict[str, dict[str, tuple[list[int], str, str]]] = {}
    for item in nouns:
        entries = table.setdefault(str(item["image_id"]), {})
        for phrase, idx, status, error in phrase_entries(item):
            entries.setdefault(phrase, (idx, status, error))
    return table


def authors_rows(entry: dict[str, Any], nouns: dict[str, tuple[list[int], str, str]] | None, masks_dir: Path,
                 resolution: int) -> list[dict[str, Any]]:
    """Rows of one metadata line: one per ``[word, path]`` of its ``attn_list`` (token indices from nouns)."""
    if "bad_line" in entry:
        return [masks_row({"image_id": f"line{entry['bad_line']}"}, "", [], "bad_metadata", entry["error"])]
    item = {"image_id": Path(entry["file_name"]).stem, "caption": entry.get("text")}
    if not entry["attn_list"]:
        return [masks_row(item, "", [], "no_phrases", f"caption {item['image_id']}: empty attn_list")]
    rows = []
    for word, path in entry["attn_list"]:
        idx, status, error = (nouns or {}).get(word, ([], "missing", f"{word!r} not in artifacts/nouns for {item['image_id']}"))
        if path is None:
            rows.append(masks_row(item, word, idx, "no_detection", "the authors' metadata has no mask for this phrase"))
        elif status != STATUS_OK:
            rows.append(masks_row(item, word, idx, "not_aligned", error or status))
        else:
            mask, m_status, m_error = phrase_mask(path, masks_dir)
            if mask is None:
                rows.append(masks_row(item, word, idx, m_status, m_error))
                continue
            small = train_mask(mask, resolution)
            rows.append(masks_row(item, word, idx, STATUS_OK if small.any() else "outside_crop",
                                  "" if small.any() else f"mask lies outside the {resolution}px centre crop",
                                  mask=rle_encode(mask), train_mask=rle_encode(small)))
    return rows


def write_authors_masks(ctx: RunContext, scale: MasksScale) -> list[Path]:
    """Convert the authors' metadata + mask PNGs into ``ctx.out_dir`` shards (resumable)."""
    for key in ("authors_metadata", "authors_masks"):
        if not str(getattr(scale, key)).strip():
            raise MissingInputError(f"profiles.<p>.masks.{key} is empty: masks.source: authors needs the path of "
                                    f"the authors' {'metadata.jsonl' if key == 'authors_metadata' else 'mask folder'}")
    masks_dir = Path(scale.authors_masks)
    if not masks_dir.is_dir():
        raise MissingInputError(f"{masks_dir}: authors' mask folder not found; unpack coco_gsam_seg.tar there "
                                f"or set profiles.<p>.masks.authors_masks")
    try:
        text = read_source(scale.authors_metadata).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MissingInputError(f"authors' metadata: {err}; set profiles.<p>.masks.authors_metadata") from err
    entries = read_records(text, scale.authors_metadata, keep_bad=True)
    lookup = _nouns_lookup(read_nouns(ctx.nouns_dir))
    masks = files_digest(dir_files(masks_dir), relative_to=masks_dir, full_hash_limit=-1)  # size and mtime
    fingerprint = {"source": "authors", "metadata": fingerprint_of(text), "masks": masks,
                   "nouns": files_digest(shards.shard_files(ctx.nouns_dir)), "resolution": ctx.resolution}
    code = code_digest(__name__)
    shards.prepare_for_ranks(ctx.out_dir, len(entries), scale.shard_size, fingerprint, ctx.rank, ctx.barrier, code)

    def process(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows of one shard's metadata lines."""
        return [row for e in chunk for row in
                authors_rows(e, lookup.get(Path(e.get("file_name", "")).stem), masks_dir, ctx.resolution)]

    return write_shards(ctx.out_dir, entries, process, scale.shard_size, fingerprint, ctx.rank, ctx.world_size,
                        code=code, desc="authors masks")
