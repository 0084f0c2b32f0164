"""Resumable Parquet shard directories, PNG bytes and COCO RLE masks (DESIGN §4 "Artifacts").

A shard directory holds ``part-00000.parquet``, ``part-00001.parquet``, ... and ``_fingerprint.json``.
Work items are split into fixed, ordered shards of ``shard_size`` items; shard ``i`` always holds items
``[i*S, (i+1)*S)``. Each shard is written to a temporary file and renamed into place, so a shard file
either exists complete or not at all. A rerun after a kill skips the shards that exist and produces
exactly the files an uninterrupted run would have (no row lost, none duplicated); shards whose rows record
a retryable failure (``redo_statuses``, e.g. out of memory) are computed again. The fingerprint records
what the shards were computed from; if it changes (other params, other code), stale shards are removed.
Each shard also records the digest of its own items (:func:`items_digest`, in the Parquet schema
metadata): a rerun over a longer or shorter item list (more prompts, a larger subset) keeps every shard
whose items are unchanged, computes the others and removes shards past the new end.

With several processes (``accelerate launch``), rank ``r`` of ``w`` writes shards ``i`` with
``i % w == r``; the files do not overlap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from .config import MissingInputError, StageError

log = logging.getLogger(__name__)

T = TypeVar("T")

FINGERPRINT_FILE = "_fingerprint.json"
ITEMS_KEY = b"shard_items"  # Parquet schema metadata: items_digest of the items a shard was computed from
STATUS_OK = "ok"


def shard_path(out_dir: Path, index: int) -> Path:
    """Path of shard ``index`` in ``out_dir``."""
    return Path(out_dir) / f"part-{index:05d}.parquet"


def fingerprint_of(obj: Any) -> str:
    """A short SHA-256 of a JSON-serialisable object (params, item keys, input hashes); NumPy arrays count
    by their values, bytes by their SHA-256, anything else JSON cannot write by its ``str``."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _json_default(obj: Any) -> Any:
    """JSON stand-in for the values :func:`fingerprint_of` meets in items and params."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bytes):
        return hashlib.sha256(obj).hexdigest()
    return str(obj)


def items_digest(items: Sequence[Any]) -> str:
    """Digest of one shard's work items (:func:`item_identity` of each, in order)."""
    return fingerprint_of([item_identity(item) for item in items])


def item_identity(item: Any) -> Any:
    """What identifies one work item, as plain JSON values: a file (``Path``) by its name and content, a
    dataclass by its fields, containers element by element, NumPy values by their values, bytes by their
    SHA-256. Any other type is an error: its ``str`` might elide content or hold a memory address."""
    if item is None or isinstance(item, (str, bool, int, float)):
        return item
    if isinstance(item, Path):
        return {"file": item.name, "content": files_digest([item])}
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return {f.name: item_identity(getattr(item, f.name)) for f in dataclasses.fields(item)}
    if isinstance(item, dict):
        return {str(k): item_identity(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [item_identity(v) for v in item]
    if isinstance(item, np.ndarray):
        return item_identity(item.tolist())
    if isinstance(item, np.generic):
        return item.item()
    if isinstance(item, bytes):
        return {"sha256": hashlib.sha256(item).hexdigest()}
    raise TypeError(f"items_digest: no identity for a work item of type {type(item).__name__}; pass plain "
                    f"values, dataclasses, arrays, bytes or Paths")


def prepare_shard_dir(out_dir: Path, fingerprint: Any, num_shards: int, rank: int = 0) -> None:
    """Create ``out_dir``; drop shards left by a run with another fingerprint, and shards numbered
    ``num_shards`` or above (a run over more items).

    Only rank 0 cleans, then writes the fingerprint file; other ranks wait until that file holds the
    current fingerprint, so no rank skips a stale shard that rank 0 is about to delete. (Shards past the
    end belong to no rank, so removing them races with nothing.)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = _dir_record(fingerprint)
    fp_file = out_dir / FINGERPRINT_FILE
    if rank != 0:
        _wait_for_fingerprint(fp_file, record)
        return
    for tmp in out_dir.glob(f".tmp-*-{FINGERPRINT_FILE}"):  # only rank 0 writes it: a killed run's leftover
        tmp.unlink(missing_ok=True)
    if fp_file.exists():
        previous = _read_record(fp_file)
        if previous == record:
            _remove_shards_from(out_dir, num_shards)
            return
        why = "code or params changed since the last run" if previous else f"{FINGERPRINT_FILE} is unreadable"
        log.warning("%s: %s; removing stale shards", out_dir, why)
    for stale in out_dir.glob("part-*.parquet"):
        stale.unlink(missing_ok=True)
    for tmp in out_dir.glob(".tmp-*"):
        tmp.unlink(missing_ok=True)
    tmp = fp_file.with_name(f".tmp-{os.getpid()}-{FINGERPRINT_FILE}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, fp_file)


def _dir_record(fingerprint: Any) -> dict[str, str]:
    """What the fingerprint file of a shard directory holds for ``fingerprint``."""
    return {"fingerprint": fingerprint_of(fingerprint)}


def _read_record(fp_file: Path) -> dict | None:
    """The record in a fingerprint file; None when it is missing or not JSON (the shards then count as stale)."""
    try:
        return json.loads(fp_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


SHARD_FILE = re.compile(r"(\.tmp-\d+-)?part-(\d+)\.parquet")  # a shard, or a killed run's partial write of one


def _remove_shards_from(out_dir: Path, first: int) -> None:
    """Delete the shards numbered ``first`` and above, and partial writes of them left by a killed run (the
    item list is shorter than when they were written; no rank owns them now)."""
    extra = [p for p in out_dir.iterdir() if (m := SHARD_FILE.fullmatch(p.name)) and int(m.group(2)) >= first]
    shards_past_end = sum(not p.name.startswith(".tmp-") for p in extra)
    if shards_past_end:
        log.info("%s: %d shards past the last item removed (fewer items than the last run)", out_dir,
                 shards_past_end)
    for path in extra:
        path.unlink(missing_ok=True)


def _wait_for_fingerprint(fp_file: Path, record: dict, timeout_s: float = 3600.0) -> None:
    """Block until rank 0 has written ``record`` to ``fp_file`` (it does so right after cleaning)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _read_record(fp_file) == record:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{fp_file}: rank 0 did not prepare the shard directory within {timeout_s:.0f} s")


def write_table(rows: list[dict[str, Any]], path: Path, items: str | None = None) -> None:
    """Write ``rows`` to ``path`` atomically (temporary file in the same directory, synced, then renamed);
    ``items``, the :func:`items_digest` of the items the rows came from, is kept in the schema metadata."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    if items is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), ITEMS_KEY: items.encode()})
    pq.write_table(table, tmp)
    _fsync(tmp)  # the bytes reach the disk before the name does: a power cut leaves no half-written shard
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


def module_file(module: str) -> Path | None:
    """The source file of ``module`` ("pipeline.text", "pipeline.zoo") inside this package, else None."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str | None:
    """``pipeline.x.y`` for a file of this package (``pipeline.zoo`` for its ``__init__.py``), else None."""
    try:
        rel = path.resolve().relative_to(PACKAGE_DIR).with_suffix("")
    except ValueError:
        return None
    parts = [PACKAGE, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path) -> set[str]:
    """Every module name an ``import`` statement of ``path`` may load (top-level and inside functions),
    with the parent packages Python runs first; ``from m import x`` also names ``m.x`` in case x is a
    submodule."""
    import ast

    name = _module_name(path) or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    parents = {".".join(m.split(".")[:k]) for m in found for k in range(1, m.count(".") + 1)}
    return found | parents


def import_closure(*roots: str | Path) -> list[Path]:
    """Source files of this package that ``roots`` import, directly or through each other (static).

    Args:
        roots: module names ("pipeline.training") or paths of Python files (a stage script).
    Returns:
        Sorted paths: the roots that lie in this package and every package file they may import.
    """
    todo = [Path(r) if isinstance(r, Path) or str(r).endswith(".py") else module_file(str(r)) for r in roots]
    if any(t is None or not t.is_file() for t in todo):
        raise ValueError(f"import_closure: {roots} must be modules of {PACKAGE} or existing .py files")
    seen: set[Path] = set()
    while todo:
        path = todo.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(module_file, _imported_modules(path)) if f is not None]
    return sorted(p for p in seen if _module_name(p) is not None)


def files_digest(paths: Iterable[Path], relative_to: Path | None = None, full_hash_limit: int = 256 << 20) -> str:
    """SHA-256 (16 hex digits) over files: each one's name (its path relative to ``relative_to`` when given,
    else the bare name, so a moved copy hashes the same) and its bytes; files above ``full_hash_limit``
    bytes (model weights) count by size and modification time instead of content."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        name = path.relative_to(relative_to).as_posix() if relative_to is not None else path.name
        h.update(name.encode() + b"\0")
        stat = path.stat()
        if stat.st_size <= full_hash_limit:
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def dir_files(path: Path) -> list[Path]:
    """Regular files under ``path`` (a file itself when ``path`` is one; [] when missing)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


def code_digest(*roots: str | Path) -> str:
    """SHA-256 (16 hex digits) of the code that computes a result: the files of :func:`import_closure`.

    Part of every shard and checkpoint fingerprint. DVC reruns a stage when its code changes, but its
    persistent, resumable outputs would otherwise be resumed as they are; with the code in the
    fingerprint, results written by other code are recomputed, and a rerun after a kill (same code) still
    resumes. Only the modules the work imports count, so editing an unrelated module (the report, say)
    keeps a half-finished training run's checkpoints.
    """
    return files_digest(import_closure(*roots), relative_to=PACKAGE_DIR)


def shard_record(fingerprint: Any, shard_size: int, code: str) -> dict[str, Any]:
    """What a shard directory's results depend on: the caller's fingerprint, the shard size and the code
    that computes the rows (``code``, from :func:`code_digest`). The items count per shard (:func:`items_digest`)."""
    return {"params": fingerprint, "shard_size": shard_size, "code": code}


def prepare_for_ranks(out_dir: Path, num_items: int, shard_size: int, fingerprint: Any, rank: int,
                      barrier: Callable[[], None] | None, code: str) -> None:
    """Before several ranks write: rank 0 drops stale shards (and temporary files of a killed run), then all
    ranks meet at ``barrier``, so no rank skips a stale shard that rank 0 is about to delete.

    The record is the one :func:`write_shards` writes (same ``fingerprint`` and ``code``),
    so its own check is then a no-op.
    """
    out_dir = Path(out_dir)
    if rank == 0:
        prepare_shard_dir(out_dir, shard_record(fingerprint, shard_size, code), _num_shards(num_items, shard_size),
                          rank)
        for tmp in out_dir.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
    if barrier is not None:
        barrier()


def write_shards(
    out_dir: Path,
    items: Sequence[T],
    process: Callable[[list[T]], list[dict[str, Any]]],
    shard_size: int,
    fingerprint: Any,
    rank: int = 0,
    world_size: int = 1,
    *,
    code: str,
    desc: str = "shards",
    redo_statuses: Collection[str] = (),
) -> list[Path]:
    """Process ``items`` shard by shard and write each shard's rows; skip shards already written from the
    same items.

    Args:
        out_dir: shard directory (created if needed).
        items: the ordered work items; their order fixes the shard contents.
        process: maps one shard's items to its rows (a row per item, or several; failed items must come
            back as rows with a ``status`` and an ``error``, never be dropped).
        shard_size: items per shard (> 0).
        fingerprint: JSON-serialisable description of params and inputs; a change invalidates old shards.
            The items need not be in it: each shard records its own (:func:`items_digest`), and a shard
            whose items changed is computed again while the others are kept.
        code: :func:`code_digest` of the module whose code computes the rows; a change invalidates them too.
        rank, world_size: this process's share of the shards.
        desc: progress-bar label.
        redo_statuses: row statuses that record a failure worth retrying (an exception while processing,
            e.g. out of memory or a network error): a rerun computes the written shards holding such rows
            again. Deterministic outcomes (bad input, an empty mask) are kept.

    Returns:
        The paths of the shards this rank is responsible for.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    prepare_shard_dir(out_dir, shard_record(fingerprint, shard_size, code), _num_shards(len(items), shard_size), rank)
    mine = _my_shards(len(items), shard_size, rank, world_size)
    _remove_partial_writes(out_dir, mine)
    digests = {i: items_digest(_chunk(items, i, shard_size)) for i in mine}
    state = {i: _written_state(shard_path(out_dir, i), redo_statuses, digests[i]) for i in mine}
    todo = [i for i in mine if state[i] != "done"]
    if len(todo) < len(mine):
        log.info("%s: resuming, %d of %d shards already written", out_dir, len(mine) - len(todo), len(mine))
    for kind, message in (("broken", "unreadable (damaged after it was written); computing it again"),
                          ("other_items", "computed from other items (the item list changed); computing again"),
                          ("retry", f"holds rows with status {'/'.join(sorted(redo_statuses))}; computing again")):
        names = [shard_path(out_dir, i).name for i in mine if state[i] == kind]
        if names:
            log.log(logging.WARNING if kind == "broken" else logging.INFO, "%s: %s %s", out_dir,
                    ", ".join(names) if len(names) <= 5 else f"{len(names)} shards", message)
    for index in tqdm(todo, desc=desc, unit="shard", disable=not todo):
        write_table(process(_chunk(items, index, shard_size)), shard_path(out_dir, index), items=digests[index])
    return [shard_path(out_dir, i) for i in mine]


def _num_shards(num_items: int, shard_size: int) -> int:
    """Shards needed for ``num_items`` items at ``shard_size`` per shard."""
    return (num_items + shard_size - 1) // shard_size


def _my_shards(num_items: int, shard_size: int, rank: int, world_size: int) -> list[int]:
    """Indices of the shards rank ``rank`` of ``world_size`` writes: ``i % world_size == rank``."""
    return [i for i in range(_num_shards(num_items, shard_size)) if i % world_size == rank]


def _chunk(items: Sequence[T], index: int, shard_size: int) -> list[T]:
    """The items of shard ``index``: ``items[index*S : (index+1)*S]``."""
    return list(items[index * shard_size : (index + 1) * shard_size])


def pending_shards(out_dir: Path, items: Sequence[Any], shard_size: int, fingerprint: Any, *, code: str,
                   rank: int = 0, world_size: int = 1, redo_statuses: Collection[str] = ()) -> list[int]:
    """This rank's shards that :func:`write_shards` with the same arguments would compute: all of them when
    the directory was written with another fingerprint or code. Reads only; a stage can skip loading its
    models when nothing is pending."""
    out_dir = Path(out_dir)
    mine = _my_shards(len(items), shard_size, rank, world_size)
    if _read_record(out_dir / FINGERPRINT_FILE) != _dir_record(shard_record(fingerprint, shard_size, code)):
        return mine
    return [i for i in mine if _written_state(shard_path(out_dir, i), redo_statuses,
                                              items_digest(_chunk(items, i, shard_size))) != "done"]


def _remove_partial_writes(out_dir: Path, indices: Sequence[int]) -> None:
    """Delete temporary files a killed run left for shards ``indices``.

    Only the rank that owns a shard ever writes it, and this rank has not started writing yet, so every
    such file is a leftover (never a write in progress).
    """
    for index in indices:
        for tmp in Path(out_dir).glob(f".tmp-*-{shard_path(out_dir, index).name}"):
            tmp.unlink(missing_ok=True)


def _written_state(path: Path, redo_statuses: Collection[str], items: str) -> str:
    """State of the shard at ``path``, to be computed from items with digest ``items``:

    ``"missing"``; ``"broken"`` when it has no Parquet footer or, when ``redo_statuses`` asks for it, no
    readable ``status`` column (shards are renamed into place whole: such a file was damaged afterwards);
    ``"other_items"`` when it records another items digest (or none); ``"retry"`` when a row's status is in
    ``redo_statuses``; else ``"done"``. Damage in other columns shows when a reader reads them
    (:func:`read_table` names the file)."""
    if not path.exists():
        return "missing"
    try:
        schema = pq.read_schema(path)
        if (schema.metadata or {}).get(ITEMS_KEY) != items.encode():
            return "other_items"
        return "retry" if _has_status(path, schema, redo_statuses) else "done"
    except (pa.ArrowException, OSError):
        return "broken"


def read_table(path: Path, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    """One shard as a table (``pq.read_table`` arguments); an unreadable file is an error naming it and the
    stage to rerun."""
    try:
        return pq.read_table(path, columns=columns, filters=filters)
    except (pa.ArrowException, OSError) as err:
        stage = _producer(path)
        todo = f"`dvc repro -s {stage}`" if stage else "the stage that wrote it"
        raise ShardReadError(f"{path}: unreadable shard ({err}); delete it and rerun {todo}, which computes "
                             f"it again") from err


class ShardReadError(StageError, RuntimeError):
    """A shard file exists but cannot be read as Parquet (the message names it and the stage to rerun)."""


def _has_status(path: Path, schema: pa.Schema, statuses: Collection[str]) -> bool:
    """Whether the shard at ``path`` (with ``schema``) has a row whose ``status`` is in ``statuses``."""
    if not statuses:
        return False
    if "status" not in schema.names:
        return False
    return any(s in statuses for s in pq.read_table(path, columns=["status"]).column("status").to_pylist())


# The stage that writes each shard directory (named in the error when one is missing).
PRODUCERS = {"artifacts/data/images": "train_data", "artifacts/nouns": "nouns", "artifacts/masks": "masks",
             "artifacts/samples": "sample", "artifacts/detections": "detect", "artifacts/edits": "edit",
             "artifacts/visor": "visor"}


def _producer(path: Path) -> str | None:
    """The stage that writes the shards at ``path`` (a shard directory or file), if it is one of PRODUCERS."""
    return next((s for prefix, s in PRODUCERS.items() if prefix in Path(path).as_posix()), None)


def shard_files(out_dir: Path) -> list[Path]:
    """Sorted shard files of ``out_dir``; a clear error, naming the stage to run, when it is missing."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        stage = _producer(out_dir)
        todo = f"run `dvc repro {stage}`" if stage else "run the stage that writes it"
        raise MissingInputError(f"{out_dir}: shard directory not found; {todo}")
    return sorted(out_dir.glob("part-*.parquet"))


def read_shards(out_dir: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """All rows of a shard directory as one DataFrame, in shard order."""
    files = shard_files(out_dir)
    frames = [read_table(f, columns).to_pandas() for f in files]
    frames = [f for f in frames if len(f.columns)]
    if not frames:
        return pd.DataFrame(columns=columns or [])
    return pd.concat(frames, ignore_index=True)


def iter_rows(out_dir: Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a shard directory one at a time (memory stays at one shard)."""
    for f in shard_files(out_dir):
        yield from read_table(f, columns).to_pylist()


# --- images ----------------------------------------------------------------------------------------

def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """Encode a PIL image or an (H, W[, C]) uint8 array as PNG bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_from_bytes(data: bytes, mode: str = "RGB") -> Image.Image:
    """Decode PNG/JPEG bytes into a PIL image in ``mode``."""
    return Image.open(io.BytesIO(data)).convert(mode)


def decode_error(data: bytes | None) -> str | None:
    """Why ``data`` does not decode as an image (every pixel is read), or ``None`` when it does."""
    if not data:
        return "no image bytes"
    try:
        image_from_bytes(data)
    except Exception as err:  # noqa: BLE001 - PIL raises several types for bad bytes
        return f"{type(err).__name__}: {err}"
    return None


# --- masks -----------------------------------------------------------------------------------------

def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a binary (H, W) mask: ``{"size": [H, W], "counts": str}`` (pycocotools)."""
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects an (H, W) mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode :func:`rle_encode` output back into an (H, W) bool mask."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def image_set_summary(out_dir: Path) -> dict[str, int]:
    """Flat counts of a training-images shard directory (``artifacts/data/images``, COCO or demo): ``images``,
    ``ok``, ``failed`` and one count per failure status (e.g. ``download_failed``), ``train`` and ``heldout``
    (usable images of each split) and ``objects`` (object masks, demo images only)."""
    counts = {"images": 0, "ok": 0, "failed": 0, "train": 0, "heldout": 0, "objects": 0}
    for row in iter_rows(Path(out_dir), columns=["split", "objects", "status"]):
        counts["images"] += 1
        if row["status"] != STATUS_OK:
            counts["failed"] += 1
            counts[row["status"]] = counts.get(row["status"], 0) + 1
            continue
        counts["ok"] += 1
        if row["split"] in ("train", "heldout"):
            counts[row["split"]] += 1
        counts["objects"] += len(row["objects"] or [])
    return counts
