"""The paper profile's training inputs: TokenCompose's metadata and its COCO train2017 images (SPEC §2.7).

* :func:`read_tokencompose_metadata` reads the authors' ``metadata.jsonl`` (one JSON object per line:
  ``file_name``, ``text``, ``attn_list`` = ``[[phrase, mask path or null], ...]``) from a path or URL and
  checks every record, naming the line of a malformed one.
* :func:`authors_nouns_rows` turns those records into ``artifacts/nouns`` rows for ``phrases: authors``:
  the authors' phrases, aligned to CLIP tokens at their own position in the caption, with their mask paths.
* :func:`write_coco_training_set` downloads the COCO train2017 images the metadata names into
  ``artifacts/data/images`` shards (resumable), with retries, size and decode checks; an image that cannot
  be fetched becomes a row with a status and an error naming its URL.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from pipeline.fetch import FetchError, fetch, read_source
from pipeline.metadata import MetadataError, read_records
from pipeline.seeding import numpy_rng
from pipeline.store.shards import STATUS_OK, write_shards
from pipeline.store.identity import code_digest, fingerprint_of
from pipeline.datasets.training_images import image_set_summary
from pipeline.store.codecs import png_bytes
from pipeline.text import failed_row, image_row_failure, locate_phrases, nouns_row

log = logging.getLogger(__name__)

DEFAULT_IMAGE_BASE_URL = "http://images.cocodataset.org/train2017/"
TOKENCOMPOSE_METADATA_URL = (
    "https://raw.githubusercontent.com/mlpc-ucsd/TokenCompose/5633f816116fdf7de74d9055ff9666c5222416e2/"
    "train/data/coco_gsam_img/train/metadata.jsonl"
)


def read_metadata_text(source: str | Path, retries: int = 3, timeout: float = 30.0) -> str:
    """Text of a metadata file at a local path or a URL (UTF-8); a :class:`MetadataError` when unreadable."""
    try:
        return read_source(source, retries, timeout).decode("utf-8")
    except FileNotFoundError as err:
        raise MetadataError(f"{source}: metadata file not found; give a path or an http(s) URL") from err
    except OSError as err:
        raise MetadataError(str(err)) from err


# --- metadata --------------------------------------------------------------------------------------

def read_tokencompose_metadata(path: str | Path, retries: int = 3, timeout: float = 30.0) -> list[dict[str, Any]]:
    """TokenCompose's ``metadata.jsonl`` (SPEC §2.7) from a path or URL: a list of checked records.

    Each record is ``{"file_name": str, "text": str, "attn_list": [[phrase, mask path | None], ...]}``.
    Raises :class:`MetadataError` naming the file and line of a malformed record.
    """
    return read_records(read_metadata_text(path, retries, timeout), str(path))


def image_id_of(file_name: str) -> str:
    """``"000000000142.jpg"`` -> ``"000000000142"`` (SPEC §2.7's ``img_id``)."""
    return Path(file_name).stem


# --- nouns rows from the authors' phrases ----------------------------------------------------------

def authors_nouns_row(record: dict[str, Any], tokenizer: Any, max_token_index: int) -> dict[str, Any]:
    """A ``nouns`` row of one metadata record: its phrases, their alignment, their mask paths.

    Every phrase is aligned at its own position in the caption (:func:`pipeline.text.locate_phrases`),
    with a mask or without: the masks stage decides what a null mask means (``no_detection`` with
    ``masks.source: authors``, as the original training dropped such words; grounded anew with
    ``grounded_sam``). The row has an extra column ``mask_paths`` (list of str or None, as in the metadata).
    """
    image_id = image_id_of(record["file_name"])
    phrases = [p for p, _ in record["attn_list"]]
    starts = locate_phrases(record["text"], phrases)
    return nouns_row(tokenizer, image_id, record["text"], phrases, starts, max_token_index,
                     mask_paths=[m for _, m in record["attn_list"]])


def authors_nouns_rows(image_rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], tokenizer: Any,
                       max_token_index: int) -> list[dict[str, Any]]:
    """``nouns`` rows for the images rows (``image_id``, ``caption``, ``status``) from the authors' phrases.

    An image absent from the metadata, or whose caption differs from the metadata's, is a failed row.
    """
    by_id = {image_id_of(r["file_name"]): r for r in records}
    out = []
    for row in image_rows:
        image_id = str(row["image_id"])
        failure = image_row_failure(row, mask_paths=[])
        record = by_id.get(image_id)
        if failure is None and record is None:
            failure = failed_row(image_id, row["caption"], "not_in_metadata",
                                 f"caption {image_id}: image not in the authors' metadata", mask_paths=[])
        elif failure is None and record["text"] != row["caption"]:
            failure = failed_row(image_id, row["caption"], "caption_mismatch",
                                 f"caption {image_id}: {row['caption']!r} differs from the metadata's "
                                 f"{record['text']!r}", mask_paths=[])
        out.append(failure or authors_nouns_row(record, tokenizer, max_token_index))
    return out


# --- COCO training images --------------------------------------------------------------------------

def split_of(image_id: str, heldout_fraction: float, seed: int) -> str:
    """``"heldout"`` for a seeded ``heldout_fraction`` share of images (keyed by id), else ``"train"``."""
    return "heldout" if numpy_rng(seed, "heldout", image_id).random() < heldout_fraction else "train"


def checked_image_bytes(data: bytes, url: str) -> bytes:
    """``data`` if it decodes to an RGB JPEG/PNG; other modes re-encoded as RGB PNG; ``ValueError`` if corrupt."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                raise ValueError("empty image")
            if image.mode == "RGB" and image.format in ("JPEG", "PNG"):
                return data
            return png_bytes(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{url}: not a decodable image ({err})") from err


def coco_image_row(record: dict[str, Any], base_url: str, heldout_fraction: float, seed: int,
                   retries: int, timeout: float) -> dict[str, Any]:
    """One ``artifacts/data/images`` row: fetched and checked image, or ``status``/``error`` naming the URL."""
    image_id = image_id_of(record["file_name"])
    url = base_url.rstrip("/") + "/" + record["file_name"]
    row = dict(image_id=image_id, image=None, caption=record["text"],
               split=split_of(image_id, heldout_fraction, seed), objects=[], status=STATUS_OK, error="")
    try:
        row["image"] = checked_image_bytes(fetch(url, retries, timeout), url)
    except FetchError as err:
        row.update(status="download_failed", error=str(err))
    except ValueError as err:
        row.update(status="decode_failed", error=str(err))
    if row["status"] != STATUS_OK:
        log.warning("image %s: %s", image_id, row["error"])
    return row


FIRST_IMAGES_CHECKED = 16  # when all of a run's first 16 downloads fail, the source is unreachable


def check_first_downloads(rows: list[dict[str, Any]], base_url: str) -> None:
    """Stop the run when its first :data:`FIRST_IMAGES_CHECKED` downloads all failed (no network, wrong
    ``image_base_url``) instead of trying the other images one by one for hours."""
    if len(rows) == FIRST_IMAGES_CHECKED and all(r["status"] == "download_failed" for r in rows):
        raise FetchError(f"the first {FIRST_IMAGES_CHECKED} COCO images all failed to download from {base_url} "
                         f"(last: {rows[-1]['error']}); check the network, or point "
                         f"profiles.<p>.data.image_base_url at a local train2017 folder (file:///path/)", False)


def write_coco_training_set(metadata: str, image_base_url: str, out_dir: Path, shard_size: int,
                            heldout_fraction: float, seed: int, retries: int = 3, timeout: float = 30.0) -> dict:
    """Fetch the COCO train2017 images named in TokenCompose's metadata into ``artifacts/data/images`` shards.

    Args:
        metadata: path or URL of ``metadata.jsonl`` (e.g. :data:`TOKENCOMPOSE_METADATA_URL`).
        image_base_url: URL (or ``file://`` folder) the file names are joined to; empty means
            :data:`DEFAULT_IMAGE_BASE_URL`.
        out_dir: shard directory; finished shards are kept on a rerun, shards with failed downloads redone.
        shard_size: images per shard.
        heldout_fraction: share of images with ``split == "heldout"`` (seeded, keyed by image id).
        seed: global seed.
        retries, timeout: per-image download retries and socket timeout in seconds.

    Returns:
        Metrics: :func:`~pipeline.shards.image_set_summary` of the shards, ``metadata_records``,
        ``image_base_url``.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    base_url = image_base_url or DEFAULT_IMAGE_BASE_URL
    records = read_tokencompose_metadata(metadata, retries, timeout)
    fingerprint = {"records": fingerprint_of([[r["file_name"], r["text"]] for r in records]),
                   "base_url": base_url, "heldout_fraction": heldout_fraction, "seed": seed}

    first: list[dict[str, Any]] = []  # the first rows this run fetched, to stop early when none worked

    def process(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for record in chunk:
            rows.append(coco_image_row(record, base_url, heldout_fraction, seed, retries, timeout))
            if len(first) < FIRST_IMAGES_CHECKED:
                first.append(rows[-1])
                check_first_downloads(first, base_url)
        return rows

    write_shards(Path(out_dir), records, process, shard_size, fingerprint, code=code_digest(__name__),
                 desc="coco images", redo_statuses=("download_failed",))
    metrics = {**image_set_summary(out_dir), "metadata_records": len(records), "image_base_url": base_url}
    log.info("COCO training set: %s", metrics)
    return metrics
