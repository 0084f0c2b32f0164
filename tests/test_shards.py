"""Shard writer: atomic shards, resume, the stash of other settings' shards, rank split; RLE and PNG round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import MissingInputError
from pipeline.store import codecs, identity, shards


def _process(calls):
    def run(chunk):
        calls.append(list(chunk))
        return [{"key": k, "value": k * k, "status": "ok", "error": ""} for k in chunk]

    return run


def test_write_and_resume_skip_finished_shards(tmp_path):
    calls = []
    out = tmp_path / "out"
    shards.write_shards(out, list(range(10)), _process(calls), 3, {"p": 1}, code="test")
    assert len(calls) == 4
    first = {p.name: p.read_bytes() for p in shards.shard_files(out)}
    shards.shard_path(out, 2).unlink()  # as if killed before shard 2 was renamed into place
    calls.clear()
    shards.write_shards(out, list(range(10)), _process(calls), 3, {"p": 1}, code="test")
    assert calls == [[6, 7, 8]]
    assert {p.name: p.read_bytes() for p in shards.shard_files(out)} == first
    df = shards.read_shards(out)
    assert df["key"].tolist() == list(range(10))


def test_changed_fingerprint_stashes_the_shards_and_returning_restores_them(tmp_path):
    """Other settings compute anew; the finished shards of the old settings wait in the stash under their own
    key (outside the output) and come back, computing nothing, when the old settings return."""
    calls = []
    out = tmp_path / "artifacts" / "samples" / "m" / "coco"
    shards.write_shards(out, list(range(6)), _process(calls), 2, {"p": 1}, code="test")
    first = {p.name: p.read_bytes() for p in shards.shard_files(out)}
    old_key = json.loads((out / shards.FINGERPRINT_FILE).read_text())["fingerprint"]
    calls.clear()
    shards.write_shards(out, list(range(4)), _process(calls), 2, {"p": 2}, code="test")
    assert len(calls) == 2 and len(shards.shard_files(out)) == 2
    other_key = json.loads((out / shards.FINGERPRINT_FILE).read_text())["fingerprint"]
    stash = tmp_path / "artifacts" / ".stash" / "samples" / "m" / "coco" / old_key
    assert shards.stash_dir(out, old_key) == stash
    assert {p.name: p.read_bytes() for p in stash.glob("part-*.parquet")} == first
    calls.clear()
    shards.write_shards(out, list(range(6)), _process(calls), 2, {"p": 1}, code="test")
    assert calls == [] and {p.name: p.read_bytes() for p in shards.shard_files(out)} == first
    assert len(list(shards.stash_dir(out, other_key).glob("part-*.parquet"))) == 2  # the {"p": 2} run's shards


def test_a_stash_outside_an_artifacts_folder_sits_beside_the_output(tmp_path):
    assert shards.stash_dir(tmp_path / "out", "k") == tmp_path / ".stash" / "out" / "k"


def test_changed_code_drops_stale_shards(tmp_path):
    """Shards written by other code are recomputed (DVC reruns the stage, the persisted shards must not
    survive); with the same code a rerun resumes."""
    calls = []
    out = tmp_path / "out"
    shards.write_shards(out, list(range(6)), _process(calls), 2, {"p": 1}, code="v1")
    calls.clear()
    shards.write_shards(out, list(range(6)), _process(calls), 2, {"p": 1}, code="v1")
    assert calls == []
    shards.write_shards(out, list(range(6)), _process(calls), 2, {"p": 1}, code="v2")
    assert len(calls) == 3


def test_code_digest_covers_exactly_the_imported_modules(tmp_path, monkeypatch):
    """A module's digest changes with the code of the module, of what it imports (relative, absolute, lazily
    inside a function, a package's submodule) and of its package's ``__init__``; not with a module it never
    imports, and not with comments, docstrings or formatting anywhere."""
    package = tmp_path / "pipeline"
    (package / "sub").mkdir(parents=True)
    files = {"__init__.py": "", "a.py": "from .b import f\nfrom . import sub\n\ndef g():\n    import pipeline.c\n",
             "b.py": "def f():\n    return 1\n", "c.py": "X = 1\n", "unrelated.py": "Y = 1\n",
             "sub/__init__.py": "from .d import Z\n", "sub/d.py": "Z = 1\n"}
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.setattr(identity, "PACKAGE_DIR", package)
    assert [p.relative_to(package).as_posix() for p in identity.import_closure("pipeline.a")] == [
        "__init__.py", "a.py", "b.py", "c.py", "sub/__init__.py", "sub/d.py"]
    digest = identity.code_digest("pipeline.a")
    (package / "unrelated.py").write_text("Y = 2\n")
    (package / "notes.txt").write_text("not code")
    assert identity.code_digest("pipeline.a") == digest
    for name in ("b.py", "c.py", "sub/d.py", "__init__.py"):
        (package / name).write_text('"""A docstring."""\n# a comment\n\n' + files[name] + "# edited\n")
        assert identity.code_digest("pipeline.a") == digest, name
        (package / name).write_text(files[name] + "EDITED = 1\n")
        assert identity.code_digest("pipeline.a") != digest, name
        (package / name).write_text(files[name])
    assert identity.code_digest("pipeline.a") == digest
    stage = tmp_path / "stage.py"
    stage.write_text("from pipeline.b import f\n")
    assert [p.name for p in identity.import_closure(stage)] == ["__init__.py", "b.py"]


def test_failed_rows_are_retried_and_finished_ones_kept(tmp_path):
    """A shard holding a row with a retryable status is computed again on the next run; shards without one,
    and rows with other failure statuses, are kept."""
    attempts = {}

    def flaky(chunk):
        rows = []
        for k in chunk:
            attempts[k] = attempts.get(k, 0) + 1
            status = "oom" if k == 3 and attempts[k] == 1 else ("bad_input" if k == 5 else "ok")
            rows.append({"key": k, "status": status, "error": ""})
        return rows

    out = tmp_path / "out"
    shards.write_shards(out, list(range(6)), flaky, 2, {}, code="c", redo_statuses=("oom",))
    assert shards.read_shards(out)["status"].tolist() == ["ok", "ok", "ok", "oom", "ok", "bad_input"]
    shards.write_shards(out, list(range(6)), flaky, 2, {}, code="c", redo_statuses=("oom",))
    assert shards.read_shards(out)["status"].tolist() == ["ok", "ok", "ok", "ok", "ok", "bad_input"]
    assert attempts == {0: 1, 1: 1, 2: 2, 3: 2, 4: 1, 5: 1}  # only shard 1 (items 2, 3) ran again
    shards.write_shards(out, list(range(6)), flaky, 2, {}, code="c", redo_statuses=("oom",))
    assert attempts == {0: 1, 1: 1, 2: 2, 3: 2, 4: 1, 5: 1}


def test_resume_removes_partial_writes_of_a_killed_run(tmp_path):
    """A temporary shard file a kill left behind is deleted on resume (DVC must not cache it)."""
    out = tmp_path / "out"
    shards.write_shards(out, list(range(4)), _process([]), 2, {}, code="c")
    (out / ".tmp-999-part-00001.parquet").write_bytes(b"partial")
    (out / f".tmp-999-{shards.FINGERPRINT_FILE}").write_text("{")
    shards.write_shards(out, list(range(4)), _process([]), 2, {}, code="c")
    assert sorted(p.name for p in out.iterdir()) == [shards.FINGERPRINT_FILE, "part-00000.parquet",
                                                      "part-00001.parquet"]


def test_ranks_write_disjoint_shards(tmp_path):
    out = tmp_path / "out"
    items = list(range(7))
    for rank in (0, 1):
        shards.write_shards(out, items, _process([]), 2, {}, rank=rank, world_size=2, code="test")
    assert sorted(shards.read_shards(out)["key"]) == items


def test_rle_round_trip_and_png(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = codecs.rle_encode(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(codecs.rle_decode(rle), mask)
    img = (rng.random((9, 11, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(codecs.image_from_bytes(codecs.png_bytes(img))), img)
    with pytest.raises(ValueError, match="expects an \\(H, W\\) mask"):
        codecs.rle_encode(np.zeros((2, 2, 2)))


def test_damaged_shard_is_computed_again_and_a_clear_error_until_then(tmp_path):
    """A shard truncated after it was written fails readers with its name and stage; a rerun redoes it."""
    out = tmp_path / "artifacts/samples/m/coco"
    shards.write_shards(out, list(range(6)), _process([]), 2, {}, code="c")
    first = {p.name: p.read_bytes() for p in shards.shard_files(out)}
    damaged = shards.shard_path(out, 1)
    damaged.write_bytes(first[damaged.name][: len(first[damaged.name]) // 2])
    with pytest.raises(shards.ShardReadError, match=r"part-00001.parquet: unreadable shard.*dvc repro -s sample"):
        shards.read_shards(out)
    with pytest.raises(shards.ShardReadError, match="part-00001.parquet"):
        list(shards.iter_rows(out))
    calls = []
    shards.write_shards(out, list(range(6)), _process(calls), 2, {}, code="c", redo_statuses=("failed",))
    assert calls == [[2, 3]]
    assert {p.name: p.read_bytes() for p in shards.shard_files(out)} == first


def test_shard_with_a_damaged_page_but_intact_footer(tmp_path):
    """Damage inside the status column's page: a rerun that checks statuses recomputes the shard; a reader
    names it and says to delete it (damage in another column is found by the reader that reads it)."""
    import pyarrow.parquet as pq

    out = tmp_path / "artifacts/samples/m/coco"
    shards.write_shards(out, list(range(4)), _process([]), 2, {}, code="c")
    good = shards.shard_path(out, 0).read_bytes()
    path = shards.shard_path(out, 0)
    meta = pq.read_metadata(path)
    status = meta.schema.names.index("status")
    start = meta.row_group(0).column(status).data_page_offset  # the status column's first page
    path.write_bytes(good[:start] + b"\xff" * 8 + good[start + 8:])
    assert pq.read_metadata(path).num_rows == 2  # the footer still reads
    with pytest.raises(shards.ShardReadError, match=r"(?s)part-00000.parquet: unreadable shard.*delete it and rerun"):
        shards.read_shards(out)
    calls = []
    shards.write_shards(out, list(range(4)), _process(calls), 2, {}, code="c", redo_statuses=("failed",))
    assert calls == [[0, 1]] and path.read_bytes() == good


def _blob_rows(calls):
    """Rows with 4 kB of seeded random bytes each (incompressible, so a flipped byte stays a flipped value)."""
    def run(chunk):
        calls.append(list(chunk))
        return [{"key": k, "blob": np.random.default_rng(k).bytes(4000), "status": "ok"} for k in chunk]

    return run


def _accept(table):
    return None


def test_byte_damage_in_a_page_is_found_by_its_checksum(tmp_path, caplog):
    """One flipped byte inside a column's values: a plain read returns wrong bytes without noticing; the page
    checksum finds it, readers name the file, and a verifying rerun recomputes exactly that shard."""
    import logging

    import pyarrow.parquet as pq

    out, items = tmp_path / "artifacts/data/images", list(range(6))
    shards.write_shards(out, items, _blob_rows([]), 3, {}, code="c", verify=_accept)
    first = {p.name: p.read_bytes() for p in shards.shard_files(out)}
    path = shards.shard_path(out, 1)
    column = pq.read_metadata(path).row_group(0).column(1)
    assert column.path_in_schema == "blob"
    start = column.dictionary_page_offset or column.data_page_offset
    damaged = bytearray(first[path.name])
    damaged[start + column.total_compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    plain = pq.read_table(path)  # footer and page headers intact: no error without checksums
    assert plain.column("key").to_pylist() == [3, 4, 5]
    assert plain.column("blob").to_pylist() != [np.random.default_rng(k).bytes(4000) for k in (3, 4, 5)]
    with pytest.raises(shards.ShardReadError, match=r"part-00001.parquet: unreadable shard.*CRC.*dvc repro -s train_data"):
        shards.read_shards(out)
    assert shards.pending_shards(out, items, 3, {}, code="c") == []  # without verify only the footer is checked
    assert shards.pending_shards(out, items, 3, {}, code="c", verify=_accept) == [1]
    calls = []
    with caplog.at_level(logging.WARNING, logger="pipeline.store.shards"):
        shards.write_shards(out, items, _blob_rows(calls), 3, {}, code="c", verify=_accept)
    assert calls == [[3, 4, 5]]
    assert "part-00001.parquet is damaged (unreadable: " in caplog.text and "CRC" in caplog.text
    assert {p.name: p.read_bytes() for p in shards.shard_files(out)} == first


def test_verify_recomputes_the_shards_it_rejects_and_pending_shards_agrees(tmp_path, caplog):
    import logging

    items = list(range(6))
    shards.write_shards(tmp_path, items, _process([]), 2, {}, code="c")

    def reject_key_2(table):
        return "key 2 is bad" if 2 in table.column("key").to_pylist() else None

    assert shards.pending_shards(tmp_path, items, 2, {}, code="c", verify=reject_key_2) == [1]
    assert shards.pending_shards(tmp_path, items, 2, {}, code="c", verify=reject_key_2, rank=1, world_size=2) == [1]
    assert shards.pending_shards(tmp_path, items, 2, {}, code="c", verify=reject_key_2, rank=0, world_size=2) == []
    calls = []
    with caplog.at_level(logging.WARNING, logger="pipeline.store.shards"):
        shards.write_shards(tmp_path, items, _process(calls), 2, {}, code="c", verify=reject_key_2)
    assert calls == [[2, 3]]
    assert "part-00001.parquet is damaged (key 2 is bad); computing it again" in caplog.text
    calls.clear()
    shards.write_shards(tmp_path, items, _process(calls), 2, {}, code="c", verify=_accept)
    assert calls == []


def test_page_checksums_keep_the_bytes_deterministic(tmp_path):
    """Two writes of the same rows give the same file bytes (checksums are of the bytes, nothing else)."""
    rows = _blob_rows([])(list(range(5)))
    for name in ("a", "b"):
        shards.write_table(rows, tmp_path / f"{name}.parquet", items="digest")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    shards.write_table(rows[:4], tmp_path / "c.parquet", items="digest")
    assert (tmp_path / "c.parquet").read_bytes() != (tmp_path / "a.parquet").read_bytes()


def test_undecodable_images_names_the_ok_rows_that_do_not_decode():
    import pyarrow as pa

    good = codecs.png_bytes(np.zeros((4, 5, 3), np.uint8))
    table = pa.table({"image_id": ["a", "b", "c", "d", "e"],
                      "image": [good, good[: len(good) // 2], None, b"junk", good],
                      "status": ["ok", "ok", "download_failed", "ok", "ok"]})
    why = codecs.undecodable_images(table)
    assert why.startswith("2 of 4 images in column 'image' do not decode (b: ") and "; d: " in why
    assert "c:" not in why  # a failed download has no image to decode
    assert codecs.undecodable_images(table.slice(0, 1)) is None
    no_ids = codecs.undecodable_images(pa.table({"image": [good, b"x"]}))  # rows named by position
    assert no_ids.startswith("1 of 2 images in column 'image' do not decode (1: ")
    assert codecs.undecodable_images(pa.table({"key": [1]})) == "no 'image' column"


def test_missing_shard_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the stage that writes it"):
        shards.read_shards(tmp_path / "nope")
    with pytest.raises(MissingInputError, match=r"artifacts/nouns: shard directory not found; run `dvc repro nouns`"):
        shards.read_shards(tmp_path / "artifacts/nouns")


def test_other_ranks_wait_for_rank0_cleanup(tmp_path):
    """Rank 1 must not skip a stale shard that rank 0 is about to delete after a params change."""
    import threading

    out = tmp_path / "out"
    items = list(range(4))
    shards.write_shards(out, items, _process([]), 1, {"p": 1}, rank=0, world_size=2, code="test")
    shards.write_shards(out, items, _process([]), 1, {"p": 1}, rank=1, world_size=2, code="test")
    calls_rank1: list = []
    rank1 = threading.Thread(
        target=shards.write_shards, args=(out, items, _process(calls_rank1), 1, {"p": 2}),
        kwargs={"rank": 1, "world_size": 2, "code": "test"},
    )
    rank1.start()
    rank1.join(timeout=0.5)
    assert rank1.is_alive() and calls_rank1 == []  # waiting: the fingerprint on disk is still the old one
    shards.write_shards(out, items, _process([]), 1, {"p": 2}, rank=0, world_size=2, code="test")
    rank1.join(timeout=10)
    assert calls_rank1 == [[1], [3]]  # rank 1 recomputed its shards instead of keeping stale ones


def test_prepared_record_is_the_one_write_shards_keeps(tmp_path):
    items, fp = list(range(5)), {"x": 1}
    shards.prepare_for_ranks(tmp_path, len(items), 2, fp, rank=0, barrier=None, code="c")
    shards.write_table([{"v": -1}], shards.shard_path(tmp_path, 0),  # a shard "another rank" finished
                       items=identity.items_digest(items[:2]))
    (tmp_path / ".tmp-123-part-00001.parquet").write_bytes(b"partial")
    shards.prepare_for_ranks(tmp_path, len(items), 2, fp, rank=0, barrier=None, code="c")
    assert not list(tmp_path.glob(".tmp-*"))
    calls = []
    shards.write_shards(tmp_path, items, lambda c: calls.append(c) or [{"v": x} for x in c], 2, fp, code="c")
    assert calls == [[2, 3], [4]]  # shard 0 kept: no stale-shard wipe after the pre-barrier preparation


def test_files_digest_content_names_and_large_files(tmp_path):
    """Content and names count; a moved copy hashes the same by bare name but not by relative path; files
    above the limit count by size and modification time."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"12345")
    base = identity.files_digest([tmp_path / "a" / "x.bin"])
    rel = identity.files_digest([tmp_path / "a" / "x.bin"], relative_to=tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.bin").rename(tmp_path / "b" / "x.bin")
    assert identity.files_digest([tmp_path / "b" / "x.bin"]) == base
    assert identity.files_digest([tmp_path / "b" / "x.bin"], relative_to=tmp_path) != rel
    (tmp_path / "b" / "x.bin").write_bytes(b"12346")
    assert identity.files_digest([tmp_path / "b" / "x.bin"]) != base
    big = tmp_path / "b" / "x.bin"
    by_stat = identity.files_digest([big], full_hash_limit=2)
    os.utime(big, ns=(0, 0))
    assert identity.files_digest([big], full_hash_limit=2) != by_stat
    assert identity.dir_files(tmp_path) == [big] and identity.dir_files(big) == [big]
    assert identity.dir_files(tmp_path / "missing") == []


def test_missing_and_retryable_shards_are_both_computed(tmp_path):
    """A shard lost to a kill and a shard with a retryable row, in the same rerun: both are written."""
    attempts = {}

    def flaky(chunk):
        rows = []
        for k in chunk:
            attempts[k] = attempts.get(k, 0) + 1
            rows.append({"key": k, "status": "oom" if k == 1 and attempts[k] == 1 else "ok", "error": ""})
        return rows

    out = tmp_path / "out"
    shards.write_shards(out, list(range(6)), flaky, 2, {}, code="c", redo_statuses=("oom",))
    shards.shard_path(out, 2).unlink()  # killed before shard 2 was renamed into place
    shards.write_shards(out, list(range(6)), flaky, 2, {}, code="c", redo_statuses=("oom",))
    df = shards.read_shards(out)
    assert df["key"].tolist() == list(range(6)) and set(df["status"]) == {"ok"}


def test_a_new_shard_size_drops_the_old_shards(tmp_path):
    """Shard i covers other items at another shard size: keeping a written shard would lose or repeat items."""
    process = lambda chunk: [{"key": k, "status": "ok"} for k in chunk]
    shards.write_shards(tmp_path, list(range(6)), process, 3, {}, code="c")
    shards.shard_path(tmp_path, 1).unlink()
    shards.write_shards(tmp_path, list(range(6)), process, 4, {}, code="c")
    assert shards.read_shards(tmp_path)["key"].tolist() == list(range(6))


def test_shards_without_a_status_column_are_not_retried(tmp_path):
    calls = []

    def process(chunk):
        calls.append(list(chunk))
        return [{"key": k} for k in chunk]

    for _ in range(2):
        shards.write_shards(tmp_path, [0, 1], process, 1, {}, code="c", redo_statuses=("x",))
    assert calls == [[0], [1]]


def test_a_longer_item_list_keeps_the_shards_whose_items_are_unchanged(tmp_path):
    """6 -> 10 items at 4 per shard: shard 0 is kept byte for byte, shard 1 (2 items, now 4) and shard 2 are
    computed; the result equals a fresh run over the 10 items."""
    calls, out, fresh = [], tmp_path / "out", tmp_path / "fresh"
    shards.write_shards(out, list(range(6)), _process(calls), 4, {"p": 1}, code="c")
    kept = shards.shard_path(out, 0).read_bytes()
    calls.clear()
    shards.write_shards(out, list(range(10)), _process(calls), 4, {"p": 1}, code="c")
    assert calls == [[4, 5, 6, 7], [8, 9]]
    assert shards.shard_path(out, 0).read_bytes() == kept
    shards.write_shards(fresh, list(range(10)), _process([]), 4, {"p": 1}, code="c")
    assert [p.read_bytes() for p in shards.shard_files(out)] == [p.read_bytes() for p in shards.shard_files(fresh)]


def test_a_shorter_item_list_stashes_the_shards_past_its_end(tmp_path):
    calls = []
    shards.write_shards(tmp_path, list(range(10)), _process(calls), 4, {"p": 1}, code="c")
    calls.clear()
    shards.write_shards(tmp_path, list(range(4)), _process(calls), 4, {"p": 1}, code="c")
    assert calls == [] and [p.name for p in shards.shard_files(tmp_path)] == ["part-00000.parquet"]
    assert shards.read_shards(tmp_path)["key"].tolist() == [0, 1, 2, 3]
    shards.write_shards(tmp_path, list(range(10)), _process(calls), 4, {"p": 1}, code="c")
    assert calls == [] and shards.read_shards(tmp_path)["key"].tolist() == list(range(10))  # back from the stash


def test_partial_writes_past_the_new_end_are_removed_and_stray_names_left_alone(tmp_path):
    shards.write_shards(tmp_path, list(range(10)), _process([]), 2, {"p": 1}, code="c")
    (tmp_path / ".tmp-999-part-00004.parquet").write_bytes(b"partial")   # a killed run's write of shard 4
    (tmp_path / "notes.txt").write_text("kept")
    shards.write_shards(tmp_path, list(range(4)), _process([]), 2, {"p": 1}, code="c")
    assert sorted(p.name for p in tmp_path.iterdir()) == [shards.FINGERPRINT_FILE, "notes.txt",
                                                          "part-00000.parquet", "part-00001.parquet"]


def test_a_changed_item_recomputes_only_its_shard(tmp_path):
    calls = []
    shards.write_shards(tmp_path, list(range(6)), _process(calls), 2, {"p": 1}, code="c")
    calls.clear()
    shards.write_shards(tmp_path, [0, 1, 2, 30, 4, 5], _process(calls), 2, {"p": 1}, code="c")
    assert calls == [[2, 30]]
    assert shards.read_shards(tmp_path)["key"].tolist() == [0, 1, 2, 30, 4, 5]


def test_a_shard_without_an_items_record_is_computed_again(tmp_path):
    """A shard whose items are unknown (written without a digest) cannot be trusted to hold these items."""
    calls = []
    shards.write_shards(tmp_path, [0, 1], _process(calls), 2, {"p": 1}, code="c")
    shards.write_table([{"key": 7, "value": 49, "status": "ok", "error": ""}], shards.shard_path(tmp_path, 0))
    calls.clear()
    shards.write_shards(tmp_path, [0, 1], _process(calls), 2, {"p": 1}, code="c")
    assert calls == [[0, 1]] and shards.read_shards(tmp_path)["key"].tolist() == [0, 1]


def test_items_digest_identity_of_files_dataclasses_and_arrays(tmp_path):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Item:
        name: str
        index: int

    a = tmp_path / "a.bin"
    a.write_bytes(b"1")
    by_content = identity.items_digest([a])
    a.write_bytes(b"2")
    assert identity.items_digest([a]) != by_content                      # a file counts by its content
    assert identity.items_digest([Item("x", 1)]) == identity.items_digest([{"name": "x", "index": 1}])
    assert identity.items_digest([Item("x", 1)]) != identity.items_digest([Item("x", 2)])
    big = np.zeros(5000)
    changed = big.copy()
    changed[2500] = 1                                                  # str() of both elides the middle
    assert identity.items_digest([{"v": big}]) != identity.items_digest([{"v": changed}])
    assert identity.items_digest([{"b": b"x" * 10}]) != identity.items_digest([{"b": b"x" * 11}])
    assert identity.items_digest([0, 1]) != identity.items_digest([1, 0])  # order counts

    @dataclasses.dataclass(frozen=True)
    class Nested:
        source: tuple

    a.write_bytes(b"1")
    nested = identity.items_digest([("id", Nested((a, big)))])           # a Path and an array inside a tuple
    a.write_bytes(b"2")
    assert identity.items_digest([("id", Nested((a, big)))]) != nested
    assert identity.items_digest([("id", Nested((a, changed)))]) != identity.items_digest([("id", Nested((a, big)))])
    for unknown in ({1, 2}, object()):                                 # hash order / memory address in str()
        with pytest.raises(TypeError, match="no identity for a work item of type"):
            identity.items_digest([{"x": unknown}])


def test_pending_shards_is_what_write_shards_computes(tmp_path):
    fp, items = {"p": 1}, list(range(5))
    assert shards.pending_shards(tmp_path, items, 2, fp, code="c") == [0, 1, 2]      # nothing written yet
    shards.write_shards(tmp_path, items, lambda c: [{"v": x, "status": "ok"} for x in c], 2, fp, code="c")
    assert shards.pending_shards(tmp_path, items, 2, fp, code="c") == []
    assert shards.pending_shards(tmp_path, items + [5], 2, fp, code="c") == [2]      # shard 2 gets an item
    assert shards.pending_shards(tmp_path, items, 2, fp, code="c", rank=1, world_size=2) == []
    assert shards.pending_shards(tmp_path, items, 2, {"p": 2}, code="c") == [0, 1, 2]
    assert shards.pending_shards(tmp_path, items, 2, fp, code="d") == [0, 1, 2]
    shards.shard_path(tmp_path, 1).unlink()
    assert shards.pending_shards(tmp_path, items, 2, fp, code="c", rank=1, world_size=2) == [1]


def test_an_unreadable_fingerprint_file_makes_the_shards_stale_not_a_crash(tmp_path):
    calls = []
    shards.write_shards(tmp_path, [0, 1], _process(calls), 1, {"p": 1}, code="c")
    (tmp_path / shards.FINGERPRINT_FILE).write_text('{"fingerpr')          # truncated by a full disk
    assert shards.pending_shards(tmp_path, [0, 1], 1, {"p": 1}, code="c") == [0, 1]
    calls.clear()
    shards.write_shards(tmp_path, [0, 1], _process(calls), 1, {"p": 1}, code="c")
    assert calls == [[0], [1]] and shards.read_shards(tmp_path)["key"].tolist() == [0, 1]
    assert shards.pending_shards(tmp_path, [0, 1], 1, {"p": 1}, code="c") == []


def test_prune_lists_kept_work_and_removes_it_only_when_asked(tmp_path, monkeypatch, capsys):
    """Stashed shards and other training runs are listed with their sizes; ``--remove`` deletes them except
    the newest ``--keep`` per output and the run of the current trained UNet."""
    from pipeline.store import prune

    monkeypatch.chdir(tmp_path)
    out = Path("artifacts/samples/m/coco")
    for p in (1, 2, 3):
        shards.write_shards(out, list(range(4)), _process([]), 2, {"p": p}, code="c")
    for key in ("run-a", "run-b"):
        (Path("artifacts/train/checkpoints") / key / "checkpoint-10").mkdir(parents=True)
        (Path("artifacts/train/checkpoints") / key / "checkpoint-10" / "state.json").write_text("{}")
    Path("artifacts/train/unet").mkdir(parents=True)
    Path("artifacts/train/unet/training_run.json").write_text(json.dumps({"fingerprint": "run-a"}))
    found = prune.kept_work()
    assert sorted((w.group, w.key) for w in found)[0][0] == "samples/m/coco"
    assert len(found) == 4  # two stashed settings, two training runs
    assert prune.main([]) == 0 and "add --remove" in capsys.readouterr().out
    assert len(prune.kept_work()) == 4
    prune.main(["--remove", "--keep", "1"])
    left = prune.kept_work()
    assert {w.key for w in left if w.group.startswith("training")} == {"run-a", "run-b"} or \
        {w.key for w in left if w.group.startswith("training")} >= {"run-a"}
    assert len([w for w in left if w.group == "samples/m/coco"]) == 1
    prune.main(["--remove"])
    assert [w.key for w in prune.kept_work()] == ["run-a"]  # the current run is never removed
    assert len(shards.shard_files(out)) == 2  # the output itself is untouched
