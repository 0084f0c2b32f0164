"""Resumable Parquet shard directories (DESIGN §4 "Artifacts").

A shard directory holds ``part-00000.parquet``, ``part-00001.parquet``, ... and ``_fingerprint.json``.
Work items are split into fixed, ordered shards of ``shard_size`` items; shard ``i`` always holds items
``[i*S, (i+1)*S)``. Each shard is written to a temporary file and renamed into place, so a shard file
either exists complete or not at all. A rerun after a kill skips the shards that exist and produces
exactly the files an uninterrupted run would have (no row lost, none duplicated); shards whose rows record
a retryable failure (``redo_statuses``, e.g. out of memory) are computed again. The fingerprint records
what the shards were computed from; if it changes (other params, other code), the shards move to a stash
under their old key, and come back when those settings return (:func:`prepare_shard_dir`).
Each shard also records the digest of its own items (:func:`items_digest`, in the Parquet schema
metadata): a rerun over a longer or shorter item list (more prompts, a larger subset) keeps every shard
whose items are unchanged, computes the others and stashes shards past the new end.

Shards are written with Parquet page checksums (CRC32 of every page). A producer may pass ``verify``, a
check of a finished shard's content (e.g. :func:`pipeline.store.codecs.undecodable_images`): a rerun then
reads each finished shard with checksum verification and computes again every shard that fails either, so
rerunning the producer repairs damaged output.

With several processes (``accelerate launch``), rank ``r`` of ``w`` writes shards ``i`` with
``i % w == r``; the files do not overlap.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.config import MissingInputError, StageError
from pipeline.store.identity import fingerprint_of, items_digest

log = logging.getLogger(__name__)

T = TypeVar("T")

FINGERPRINT_FILE = "_fingerprint.json"
ITEMS_KEY = b"shard_items"  # Parquet schema metadata: items_digest of the items a shard was computed from
STATUS_OK = "ok"

# A check of a finished shard's rows: why the shard is damaged, or None when it is fine.
Verify = Callable[[pa.Table], str | None]


def shard_path(out_dir: Path, index: int) -> Path:
    """Path of shard ``index`` in ``out_dir``."""
    return Path(out_dir) / f"part-{index:05d}.parquet"


def prepare_shard_dir(out_dir: Path, fingerprint: Any, num_shards: int, rank: int = 0) -> None:
    """Create ``out_dir`` and make it hold only shards computed under ``fingerprint``, numbered below
    ``num_shards``. Nothing finished is deleted: shards of another fingerprint (other params, other code)
    move to the stash under their own key (:func:`stash_dir`), shards past the end (a run over fewer
    items) under this one, and the stash of ``fingerprint`` moves back in, so returning to earlier
    settings resumes their work. ``python -m pipeline.store.prune`` lists and removes stashed work.

    Only rank 0 moves files, then writes the fingerprint file; other ranks wait until that file holds the
    current fingerprint, so no rank skips a shard that rank 0 is about to move.
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
    previous = _read_record(fp_file)
    if previous != record:
        for tmp in out_dir.glob(".tmp-*"):  # partial writes of a killed run under the other fingerprint
            tmp.unlink(missing_ok=True)
        old_key = (previous or {}).get("fingerprint", UNRECORDED)
        moved = _move_shards(out_dir, stash_dir(out_dir, old_key), lambda index: True)
        if moved:
            why = "code or params changed since the last run" if previous else f"{FINGERPRINT_FILE} is unreadable"
            log.info("%s: %s; %d shards of the last run kept in %s", out_dir, why, moved,
                     stash_dir(out_dir, old_key))
        _write_record(fp_file, record)
    key = record["fingerprint"]
    restored = _move_shards(stash_dir(out_dir, key), out_dir, lambda index: index < num_shards)
    if restored:
        log.info("%s: %d shards of an earlier run with these settings restored from the stash", out_dir, restored)
    for tmp in out_dir.glob(".tmp-*part-*.parquet"):
        if int(SHARD_FILE.fullmatch(tmp.name).group(2)) >= num_shards:  # a killed run's write past the end
            tmp.unlink(missing_ok=True)
    past_end = _move_shards(out_dir, stash_dir(out_dir, key), lambda index: index >= num_shards)
    if past_end:
        log.info("%s: %d shards past the last item kept in the stash (fewer items than the last run)", out_dir,
                 past_end)


UNRECORDED = "unrecorded"  # stash key of shards found without a readable fingerprint file
STASH = ".stash"


def stash_dir(out_dir: Path, key: str) -> Path:
    """Where shards of ``out_dir`` computed under fingerprint ``key`` wait while another fingerprint is
    current: ``<artifacts>/.stash/<out_dir below artifacts>/<key>`` when ``out_dir`` lies in a folder named
    ``artifacts`` (outside every DVC output, so output hashes never see it), else
    ``<parent>/.stash/<name>/<key>``."""
    out_dir = Path(out_dir).absolute()
    root = next((p for p in out_dir.parents if p.name == "artifacts"), out_dir.parent)
    return root / STASH / out_dir.relative_to(root) / key


def _move_shards(src: Path, dst: Path, wanted: Callable[[int], bool]) -> int:
    """Move the shard files of ``src`` whose index is ``wanted`` into ``dst`` (created when needed), with
    ``src``'s fingerprint file when ``dst`` has none; a shard ``dst`` already has stays. Returns how many
    moved."""
    if not src.is_dir():
        return 0
    moved = 0
    for path in sorted(src.glob("part-*.parquet")):
        match = SHARD_FILE.fullmatch(path.name)
        if not match or not wanted(int(match.group(2))):
            continue
        dst.mkdir(parents=True, exist_ok=True)
        if (dst / path.name).exists():
            path.unlink()
        else:
            os.replace(path, dst / path.name)
        moved += 1
    if moved and (src / FINGERPRINT_FILE).exists() and not (dst / FINGERPRINT_FILE).exists():
        _write_record(dst / FINGERPRINT_FILE, _read_record(src / FINGERPRINT_FILE) or {})
    return moved


def _write_record(fp_file: Path, record: dict) -> None:
    """Write a fingerprint file atomically."""
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
    ``items``, the :func:`items_digest` of the items the rows came from, is kept in the schema metadata.

    Every page carries a CRC32 checksum (``write_page_checksum``), so byte damage is found when the shard is
    read back with verification; the same rows still give the same file bytes."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    if items is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), ITEMS_KEY: items.encode()})
    pq.write_table(table, tmp, write_page_checksum=True)
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
    verify: Verify | None = None,
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
        verify: check of a finished shard's table (None when it is fine, else why it is damaged). With it,
            every finished shard of this rank is read whole, with page checksum verification, and passed to
            ``verify``; a shard failing either is computed again (logged with its name and the reason).
            This costs a full read of the finished shards on every rerun, plus whatever ``verify`` does.

    Returns:
        The paths of the shards this rank is responsible for.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    prepare_shard_dir(out_dir, shard_record(fingerprint, shard_size, code), _num_shards(len(items), shard_size), rank)
    mine = _my_shards(len(items), shard_size, rank, world_size)
    _remove_partial_writes(out_dir, mine)
    digests = {i: items_digest(_chunk(items, i, shard_size)) for i in mine}
    found = {i: _written_state(shard_path(out_dir, i), redo_statuses, digests[i], verify) for i in mine}
    state = {i: kind for i, (kind, _) in found.items()}
    todo = [i for i in mine if state[i] != "done"]
    if len(todo) < len(mine):
        log.info("%s: resuming, %d of %d shards already written", out_dir, len(mine) - len(todo), len(mine))
    _log_broken(out_dir, {shard_path(out_dir, i).name: why for i, (kind, why) in found.items() if kind == "broken"})
    for kind, message in (("other_items", "computed from other items (the item list changed); computing again"),
                          ("retry", f"holds rows with status {'/'.join(sorted(redo_statuses))}; computing again")):
        names = [shard_path(out_dir, i).name for i in mine if state[i] == kind]
        if names:
            log.info("%s: %s %s", out_dir, ", ".join(names) if len(names) <= 5 else f"{len(names)} shards", message)
    for index in tqdm(todo, desc=desc, unit="shard", disable=not todo):
        write_table(process(_chunk(items, index, shard_size)), shard_path(out_dir, index), items=digests[index])
    return [shard_path(out_dir, i) for i in mine]


BROKEN_NAMED = 5  # damaged shards named one per line; more are counted


def _log_broken(out_dir: Path, broken: dict[str, str]) -> None:
    """Warn about the damaged shards (name -> reason) a run computes again: the first few by name and reason."""
    for name, why in list(broken.items())[:BROKEN_NAMED]:
        log.warning("%s: %s is damaged (%s); computing it again", out_dir, name, why)
    if len(broken) > BROKEN_NAMED:
        log.warning("%s: %d more damaged shards computed again", out_dir, len(broken) - BROKEN_NAMED)


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
                   rank: int = 0, world_size: int = 1, redo_statuses: Collection[str] = (),
                   verify: Verify | None = None) -> list[int]:
    """This rank's shards that :func:`write_shards` with the same arguments (``verify`` included) would
    compute: all of them when the directory was written with another fingerprint or code. Reads only; a
    stage can skip loading its models when nothing is pending."""
    out_dir = Path(out_dir)
    mine = _my_shards(len(items), shard_size, rank, world_size)
    if _read_record(out_dir / FINGERPRINT_FILE) != _dir_record(shard_record(fingerprint, shard_size, code)):
        return mine
    return [i for i in mine if _written_state(shard_path(out_dir, i), redo_statuses,
                                              items_digest(_chunk(items, i, shard_size)), verify)[0] != "done"]


def _remove_partial_writes(out_dir: Path, indices: Sequence[int]) -> None:
    """Delete temporary files a killed run left for shards ``indices``.

    Only the rank that owns a shard ever writes it, and this rank has not started writing yet, so every
    such file is a leftover (never a write in progress).
    """
    for index in indices:
        for tmp in Path(out_dir).glob(f".tmp-*-{shard_path(out_dir, index).name}"):
            tmp.unlink(missing_ok=True)


def _written_state(path: Path, redo_statuses: Collection[str], items: str,
                   verify: Verify | None = None) -> tuple[str, str]:
    """State of the shard at ``path``, to be computed from items with digest ``items``, and why it is broken:

    ``"missing"``; ``"broken"`` when it has no Parquet footer or, when ``redo_statuses`` asks for it, no
    readable ``status`` column (shards are renamed into place whole: such a file was damaged afterwards);
    ``"other_items"`` when it records another items digest (or none); ``"retry"`` when a row's status is in
    ``redo_statuses``; else ``"done"``. With ``verify``, the whole shard is read with page checksum
    verification and passed to ``verify``: a failed checksum or a reason from ``verify`` make it
    ``"broken"``. Without ``verify``, damage in other columns shows when a reader reads them (:func:`read_table`
    names the file). The second value is empty unless the state is ``"broken"``."""
    if not path.exists():
        return "missing", ""
    try:
        schema = pq.read_schema(path)
        if (schema.metadata or {}).get(ITEMS_KEY) != items.encode():
            return "other_items", ""
        if verify is None:
            return ("retry" if _has_status(path, schema, redo_statuses) else "done"), ""
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:
        return "broken", f"unreadable: {err}"
    if _statuses_in(table, redo_statuses):
        return "retry", ""
    problem = verify(table)
    return ("broken", problem) if problem else ("done", "")


def read_table(path: Path, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    """One shard as a table (``pq.read_table`` arguments), page checksums verified; an unreadable file is an
    error naming it and the stage to rerun."""
    try:
        return pq.read_table(path, columns=columns, filters=filters, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:
        stage = _producer(path)
        todo = f"`dvc repro -s {stage}`" if stage else "the stage that wrote it"
        raise ShardReadError(f"{path}: unreadable shard ({err}); delete it and rerun {todo}, which computes "
                             f"it again") from err


class ShardReadError(StageError, RuntimeError):
    """A shard file exists but cannot be read as Parquet (the message names it and the stage to rerun)."""


def _has_status(path: Path, schema: pa.Schema, statuses: Collection[str]) -> bool:
    """Whether the shard at ``path`` (with ``schema``) has a row whose ``status`` is in ``statuses``."""
    if not statuses or "status" not in schema.names:
        return False
    return _statuses_in(pq.read_table(path, columns=["status"], page_checksum_verification=True), statuses)


def _statuses_in(table: pa.Table, statuses: Collection[str]) -> bool:
    """Whether ``table`` has a ``status`` column with a value in ``statuses``."""
    if not statuses or "status" not in table.schema.names:
        return False
    return any(s in statuses for s in table.column("status").to_pylist())


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
