"""Reference sets for FID (docs/fid.md §1, §5): the captions generated from and the real images compared with.

A reference set is two things, written by stage ``fid_data`` as two DVC outputs so that sampling depends on
the captions only:

* captions ``artifacts/data/fid/captions/<name>.json``: ``{"reference", "source", "captions": [{"caption_id",
  "image_id", "text"}]}``, the prompts every model samples (one image each);
* real images ``artifacts/data/fid/images/<name>/`` (Parquet shards, resumable): rows ``image_id``, ``image``
  (the bytes as distributed: COCO's and Flickr's JPEGs are never re-encoded), ``image_sha256``, ``status``,
  ``error``.

Sources: ``coco`` (``captions_val2017.json`` or the annotations zip that holds it; images fetched from
``image_base_url`` like the training images), ``flickr30k_entities`` (a local folder: the images are
distributed by request form) and ``demo`` (drawn scenes, offline). Captions are drawn with
``python_rng(seed, "fid", <name>)``: the same seed gives the same prompts.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import InputDataError, MissingInputError
from pipeline.datasets.coco_images import checked_image_bytes, image_url, recorded_digests
from pipeline.datasets.demo_images import render_image
from pipeline.fetch import FetchError, fetch, read_pinned, sha256_bytes
from pipeline.photorealism.settings import ReferenceSpec
from pipeline.seeding import python_rng
from pipeline.store.codecs import png_bytes
from pipeline.store.shards import STATUS_OK

log = logging.getLogger(__name__)

COCO_CAPTIONS_MEMBER = "captions_val2017.json"
FLICKR_FOLDERS = ("val.txt", "Sentences", "flickr30k-images")
STATUS_DOWNLOAD_FAILED, STATUS_DECODE_FAILED = "download_failed", "decode_failed"


@dataclass(frozen=True)
class ImageJob:
    """One real image to store: its id and where it comes from (URL, local path, or a demo scene id)."""

    image_id: str
    location: str


@dataclass(frozen=True)
class Reference:
    """A reference set before its images are stored: captions (dicts) and the image jobs."""

    name: str
    source: str
    captions: list[dict[str, str]]
    images: list[ImageJob]
    source_sha256: str = ""  # of the captions file (COCO) or val.txt (Flickr30K), recorded in the metrics


def clean_text(text: str) -> str:
    """A caption with runs of whitespace collapsed, no space before final punctuation, no outer spaces."""
    return re.sub(r"\s+([.,!?;:])", r"\1", " ".join(str(text).split()))


def draw(items: list[Any], count: int | None, seed: int, *key: object) -> list[Any]:
    """``count`` items drawn without replacement with ``python_rng(seed, *key)``, in their original order;
    all of them when ``count`` is None; an error when more are asked for than there are."""
    if count is None:
        return list(items)
    if count > len(items):
        raise InputDataError(f"{'/'.join(map(str, key))}: num_captions {count} but the set has only "
                             f"{len(items)}; lower num_captions or set it to null (all)")
    chosen = set(python_rng(seed, *key).sample(range(len(items)), count))
    return [item for i, item in enumerate(items) if i in chosen]


# --- sources --------------------------------------------------------------------------------------------

def demo_reference(name: str, spec: ReferenceSpec, seed: int) -> Reference:
    """``spec.num_images`` drawn scenes (ids ``fid_<name>_00000``...), each with its caption."""
    ids = [f"fid_{name}_{i:05d}" for i in range(spec.num_images or 0)]
    captions = [{"caption_id": i, "image_id": i, "text": render_image(i, seed).caption} for i in ids]
    return Reference(name, "demo", draw(captions, spec.num_captions, seed, "fid", name),
                     [ImageJob(i, f"demo:{i}") for i in ids])


def coco_captions_json(data: bytes, source: str) -> dict[str, Any]:
    """The parsed ``captions_val2017.json`` from its bytes or from the annotations zip that holds it."""
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == COCO_CAPTIONS_MEMBER]
            if not members:
                raise InputDataError(f"{source}: zip has no {COCO_CAPTIONS_MEMBER} (give the COCO annotations "
                                     f"archive annotations_trainval2017.zip or the JSON file itself)")
            data = archive.read(members[0])
    try:
        doc = json.loads(data)
        doc["images"], doc["annotations"]  # noqa: B018 - the two keys the reader needs
    except (ValueError, KeyError, TypeError) as err:
        raise InputDataError(f"{source}: not a COCO captions file (needs 'images' and 'annotations': {err})") from err
    return doc


def coco_reference(name: str, spec: ReferenceSpec, seed: int, param: str) -> Reference:
    """COCO val2017: ``num_captions`` captions drawn from all of them; every image of the file is a real image."""
    data = read_pinned(spec.captions, spec.captions_sha256, param=f"{param}.captions_sha256")
    doc = coco_captions_json(data, str(spec.captions))
    files = {int(im["id"]): str(im["file_name"]) for im in doc["images"]}
    annotations = sorted(doc["annotations"], key=lambda a: int(a["id"]))
    unknown = [a["id"] for a in annotations if int(a["image_id"]) not in files]
    if unknown:
        raise InputDataError(f"{spec.captions}: {len(unknown)} captions name images not in the file "
                             f"(first: annotation {unknown[0]})")
    captions = [{"caption_id": str(a["id"]), "image_id": Path(files[int(a["image_id"])]).stem,
                 "text": clean_text(a["caption"])} for a in annotations]
    jobs = [ImageJob(Path(f).stem, image_url(str(spec.image_base_url), f)) for _, f in sorted(files.items())]
    return Reference(name, "coco", draw(captions, spec.num_captions, seed, "fid", name), jobs, sha256_bytes(data))


_ENTITY = re.compile(r"\[/EN#\d+(?:/[^\s\]]+)* ([^\]]*)\]")


def entity_sentence_text(line: str) -> str:
    """A Flickr30K Entities sentence without its phrase annotations: ``[/EN#18/people A child] runs .`` ->
    ``A child runs.``"""
    return clean_text(_ENTITY.sub(r"\1", line))


def flickr30k_reference(name: str, spec: ReferenceSpec, seed: int, param: str) -> Reference:
    """Flickr30K Entities val: each ``val.txt`` image once as a real image and one of its sentences
    (``python_rng(seed, "fid", name, image_id)``); ``num_captions`` of those captions drawn when set."""
    root = Path(str(spec.root))
    missing = [f for f in FLICKR_FOLDERS if not (root / f).exists()]
    if missing:
        raise MissingInputError(f"{root}: Flickr30K folder lacks {', '.join(missing)}; {param}.root must hold "
                                f"Flickr30K Entities' val.txt and Sentences/ and the Flickr30K images in "
                                f"flickr30k-images/ (distributed by request form; see docs/fid.md)")
    ids = [line.strip() for line in (root / "val.txt").read_text().splitlines() if line.strip()]
    absent = [f"{i}.jpg" for i in ids if not (root / "flickr30k-images" / f"{i}.jpg").is_file()]
    absent += [f"Sentences/{i}.txt" for i in ids if not (root / "Sentences" / f"{i}.txt").is_file()]
    if absent:
        raise MissingInputError(f"{root}: {len(absent)} files of the {len(ids)} val.txt images are missing "
                                f"(first: {absent[0]}); fix the folder or {param}.root")
    captions = []
    for image_id in ids:
        lines = [s for s in (root / "Sentences" / f"{image_id}.txt").read_text().splitlines() if s.strip()]
        if not lines:
            raise InputDataError(f"{root / 'Sentences' / (image_id + '.txt')}: no sentences")
        pick = python_rng(seed, "fid", name, image_id).randrange(len(lines))
        captions.append({"caption_id": f"{image_id}_{pick}", "image_id": image_id,
                         "text": entity_sentence_text(lines[pick])})
    jobs = [ImageJob(i, str(root / "flickr30k-images" / f"{i}.jpg")) for i in ids]
    return Reference(name, "flickr30k_entities", draw(captions, spec.num_captions, seed, "fid", name), jobs,
                     sha256_bytes((root / "val.txt").read_bytes()))


def build_reference(name: str, spec: ReferenceSpec, seed: int, param: str) -> Reference:
    """The :class:`Reference` of ``spec``'s source; ``param`` (``profiles.<p>.fid.references.<name>``) is
    named in errors."""
    if spec.source == "demo":
        return demo_reference(name, spec, seed)
    if spec.source == "coco":
        return coco_reference(name, spec, seed, param)
    return flickr30k_reference(name, spec, seed, param)


# --- real images ----------------------------------------------------------------------------------------

def image_bytes(job: ImageJob, seed: int) -> bytes:
    """The bytes of one real image as distributed (a demo scene: drawn and PNG-encoded)."""
    if job.location.startswith("demo:"):
        return png_bytes(render_image(job.location[len("demo:"):], seed).pixels)
    if "://" in job.location:
        return fetch(job.location)
    return Path(job.location).read_bytes()


def image_row(job: ImageJob, seed: int) -> dict[str, Any]:
    """One row of ``artifacts/data/fid/images/<name>``: the checked image, or a status and an error naming it."""
    row = dict(image_id=job.image_id, image=None, image_sha256="", status=STATUS_OK, error="")
    try:
        data = image_bytes(job, seed)
        row["image_sha256"] = sha256_bytes(data)
        row["image"] = checked_image_bytes(data, job.location)
    except (FetchError, OSError) as err:
        row.update(status=STATUS_DOWNLOAD_FAILED, error=f"{job.location}: {err}")
    except ValueError as err:
        row.update(status=STATUS_DECODE_FAILED, error=str(err))
    if row["status"] != STATUS_OK:
        log.warning("reference image %s: %s", job.image_id, row["error"])
    return row


FIRST_IMAGES_CHECKED = 16  # when a run's first 16 images all fail to download, the source is unreachable


def changed_upstream(row: dict[str, Any], recorded: dict[str, tuple[str, str]], out_dir: Path, job: ImageJob,
                     param: str) -> str | None:
    """Why ``row`` must not be stored: its bytes differ from the download an earlier shard recorded for the
    image (the file changed at the source; storing it would mix two versions of the reference set)."""
    earlier = recorded.get(row["image_id"])
    if not earlier or not row["image_sha256"] or row["image_sha256"] == earlier[0]:
        return None
    return (f"reference image {row['image_id']}: {job.location} now has SHA-256 {row['image_sha256']}, but "
            f"{out_dir / earlier[1]} recorded {earlier[0]}: the file changed at its source. To accept it, delete "
            f"that shard and rerun; to keep the old one, point {param} at a copy of the earlier files")


def image_rows(seed: int, out_dir: Path, param: str) -> Callable[[list[ImageJob]], list[dict[str, Any]]]:
    """The shard ``process`` function: one row per job. Stops the run when a refetched image changed at its
    source, and when the run's first :data:`FIRST_IMAGES_CHECKED` downloads all failed (no network, a wrong
    URL) instead of trying thousands of images one by one."""
    recorded = functools.cache(lambda: recorded_digests(out_dir))
    first: list[dict[str, Any]] = []

    def process(jobs: list[ImageJob]) -> list[dict[str, Any]]:
        rows = []
        for job in jobs:
            rows.append(image_row(job, seed))
            changed = changed_upstream(rows[-1], recorded(), out_dir, job, param)
            if changed:
                raise InputDataError(changed)
            if len(first) < FIRST_IMAGES_CHECKED:
                first.append(rows[-1])
                if len(first) == FIRST_IMAGES_CHECKED and all(r["status"] == STATUS_DOWNLOAD_FAILED for r in first):
                    raise FetchError(f"the first {FIRST_IMAGES_CHECKED} reference images all failed to download "
                                     f"(last: {first[-1]['error']}); check the network or {param}", False)
        return rows

    return process
