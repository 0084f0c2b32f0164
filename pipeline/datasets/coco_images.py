"""The paper profile's training images: the COCO train2017 images TokenCompose's metadata names (SPEC §2.7).

:func:`write_coco_training_set` downloads them into ``artifacts/data/images`` shards (resumable), with
retries, size and decode checks; an image that cannot be fetched becomes a row with a status and an error
naming its URL. Each row records the SHA-256 of the downloaded bytes (``image_sha256``); when a rerun fetches
an image again (its shard had a failed download), a digest other than the recorded one stops the run
(:class:`ChangedUpstreamError`) instead of mixing two versions of the training set. Only the ``train_data``
stage (``source: coco``) runs this module.
"""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.datasets.tokencompose_metadata import image_id_of, read_tokencompose_metadata
from pipeline.datasets.training_images import image_set_summary
from pipeline.config import StageError
from pipeline.fetch import FetchError, fetch, sha256_bytes
from pipeline.seeding import numpy_rng
from pipeline.store.codecs import png_bytes, undecodable_images
from pipeline.store.identity import code_digest, fingerprint_of
from pipeline.store.shards import STATUS_OK, ShardReadError, read_table, shard_files, write_shards

log = logging.getLogger(__name__)

DEFAULT_IMAGE_BASE_URL = "https://images.cocodataset.org/train2017/"


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


def image_url(base_url: str, file_name: str) -> str:
    """The URL of COCO file ``file_name`` under ``base_url`` (with or without a trailing slash)."""
    return base_url.rstrip("/") + "/" + file_name


def coco_image_row(record: dict[str, Any], base_url: str, heldout_fraction: float, seed: int,
                   retries: int, timeout: float) -> dict[str, Any]:
    """One ``artifacts/data/images`` row: fetched and checked image, or ``status``/``error`` naming the URL."""
    image_id = image_id_of(record["file_name"])
    url = image_url(base_url, record["file_name"])
    row = dict(image_id=image_id, image=None, image_sha256="", caption=record["text"],
               split=split_of(image_id, heldout_fraction, seed), objects=[], status=STATUS_OK, error="")
    try:
        data = fetch(url, retries, timeout)
        row["image_sha256"] = sha256_bytes(data)  # of the bytes as served, before any re-encoding
        row["image"] = checked_image_bytes(data, url)
    except FetchError as err:
        row.update(status="download_failed", error=str(err))
    except ValueError as err:
        row.update(status="decode_failed", error=str(err))
    if row["status"] != STATUS_OK:
        log.warning("image %s: %s", image_id, row["error"])
    return row


class ChangedUpstreamError(StageError, RuntimeError):
    """An image fetched again has another SHA-256 than the download recorded in its shard."""


def recorded_digests(out_dir: Path) -> dict[str, tuple[str, str]]:
    """``image_id -> (image_sha256, shard file name)`` of the rows in ``out_dir``'s shards that recorded one.

    Shards without the column (written before it existed) or unreadable ones (damaged; they are computed
    again) record nothing.
    """
    recorded: dict[str, tuple[str, str]] = {}
    for path in shard_files(out_dir):
        try:
            table = read_table(path, columns=["image_id", "image_sha256"])
        except ShardReadError:  # no such column (an older shard) or damaged
            continue
        for image_id, digest in zip(table.column("image_id").to_pylist(), table.column("image_sha256").to_pylist()):
            if digest:
                recorded[str(image_id)] = (digest, path.name)
    return recorded


def check_unchanged(row: dict[str, Any], recorded: dict[str, tuple[str, str]], out_dir: Path, url: str) -> None:
    """Raise :class:`ChangedUpstreamError` when ``row``'s download differs from the one ``recorded`` for its
    image; the message names the image, both digests, the shard, and how to accept the new file."""
    earlier = recorded.get(row["image_id"])
    if not earlier or not row["image_sha256"] or row["image_sha256"] == earlier[0]:
        return
    raise ChangedUpstreamError(
        f"image {row['image_id']}: {url} now has SHA-256 {row['image_sha256']}, but {Path(out_dir) / earlier[1]} "
        f"recorded {earlier[0]} for it in an earlier run: the file changed upstream, and this run would mix the "
        f"two versions. To accept the new file, delete {Path(out_dir) / earlier[1]} (its images are fetched "
        f"again) and rerun; to keep the old one, point profiles.<p>.data.image_base_url at a copy of the "
        f"earlier files")


FIRST_IMAGES_CHECKED = 16  # when all of a run's first 16 downloads fail, the source is unreachable


def check_first_downloads(rows: list[dict[str, Any]], base_url: str) -> None:
    """Stop the run when its first :data:`FIRST_IMAGES_CHECKED` downloads all failed (no network, wrong
    ``image_base_url``) instead of trying the other images one by one for hours."""
    if len(rows) == FIRST_IMAGES_CHECKED and all(r["status"] == "download_failed" for r in rows):
        raise FetchError(f"the first {FIRST_IMAGES_CHECKED} COCO images all failed to download from {base_url} "
                         f"(last: {rows[-1]['error']}); check the network, or point "
                         f"profiles.<p>.data.image_base_url at a local train2017 folder (file:///path/)", False)


def write_coco_training_set(metadata: str, image_base_url: str, out_dir: Path, shard_size: int,
                            heldout_fraction: float, seed: int, retries: int = 3, timeout: float = 30.0,
                            metadata_sha256: str | None = None) -> dict:
    """Fetch the COCO train2017 images named in TokenCompose's metadata into ``artifacts/data/images`` shards.

    Args:
        metadata: path or URL of ``metadata.jsonl`` (e.g.
            :data:`pipeline.datasets.tokencompose_metadata.TOKENCOMPOSE_METADATA_URL`).
        image_base_url: URL (or ``file://`` folder) the file names are joined to; empty means
            :data:`DEFAULT_IMAGE_BASE_URL`.
        out_dir: shard directory; finished shards are kept on a rerun, shards with failed downloads redone,
            and damaged shards (a failed page checksum, or an ``ok`` image that does not decode:
            :func:`~pipeline.store.codecs.undecodable_images`) fetched again. Verifying decodes every stored
            image on each rerun: about 10 s on one CPU core for the 4,526 images.
        shard_size: images per shard.
        heldout_fraction: share of images with ``split == "heldout"`` (seeded, keyed by image id).
        seed: global seed.
        retries, timeout: per-image download retries and socket timeout in seconds.
        metadata_sha256: SHA-256 the metadata file must have (e.g.
            :data:`~pipeline.datasets.tokencompose_metadata.TOKENCOMPOSE_METADATA_SHA256`); None: not checked.

    An image fetched again on a rerun whose bytes differ from the download its old shard recorded raises
    :class:`ChangedUpstreamError` (:func:`check_unchanged`).

    Returns:
        Metrics: :func:`~pipeline.datasets.training_images.image_set_summary` of the shards, ``metadata_records``,
        ``image_base_url``.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    base_url = image_base_url or DEFAULT_IMAGE_BASE_URL
    records = read_tokencompose_metadata(metadata, retries, timeout, metadata_sha256,
                                         "profiles.<p>.data.tokencompose_metadata_sha256")
    fingerprint = {"records": fingerprint_of([[r["file_name"], r["text"]] for r in records]),
                   "base_url": base_url, "heldout_fraction": heldout_fraction, "seed": seed}

    first: list[dict[str, Any]] = []  # the first rows this run fetched, to stop early when none worked
    # Digests of earlier downloads, read when the first shard is computed (write_shards has then stashed the
    # shards of other settings, so only downloads made under these settings are compared).
    recorded = functools.cache(lambda: recorded_digests(Path(out_dir)))

    def process(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for record in chunk:
            rows.append(coco_image_row(record, base_url, heldout_fraction, seed, retries, timeout))
            check_unchanged(rows[-1], recorded(), Path(out_dir), image_url(base_url, record["file_name"]))
            if len(first) < FIRST_IMAGES_CHECKED:
                first.append(rows[-1])
                check_first_downloads(first, base_url)
        return rows

    write_shards(Path(out_dir), records, process, shard_size, fingerprint, code=code_digest(__name__),
                 desc="coco images", redo_statuses=("download_failed",), verify=undecodable_images)
    metrics = {**image_set_summary(out_dir), "metadata_records": len(records), "image_base_url": base_url}
    log.info("COCO training set: %s", metrics)
    return metrics
