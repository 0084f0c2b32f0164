"""Shard writer: atomic shards, resume, stale-shard cleanup, rank split; RLE and PNG round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import shards


def _process(calls):
    def run(chunk):
        calls.append(list(chunk))
        return [{"key": k, "value": k * k, "status": "ok", "error": ""} for k in chunk]

    return run


def test_write_and_resume_skip_finished_shards(tmp_path):
    calls = []
    out = tmp_path / "out"
    shards.write_shards(out, list(range(10)), _process(calls), 3, {"p": 1})
    assert len(calls) == 4
    first = {p.name: p.read_bytes() for p in shards.shard_files(out)}
    shards.shard_path(out, 2).unlink()  # as if killed before shard 2 was renamed into place
    calls.clear()
    shards.write_shards(out, list(range(10)), _process(calls), 3, {"p": 1})
    assert calls == [[6, 7, 8]]
    assert {p.name: p.read_bytes() for p in shards.shard_files(out)} == first
    df = shards.read_shards(out)
    assert df["key"].tolist() == list(range(10))


def test_changed_fingerprint_drops_stale_shards(tmp_path):
    calls = []
    out = tmp_path / "out"
    shards.write_shards(out, list(range(6)), _process(calls), 2, {"p": 1})
    calls.clear()
    shards.write_shards(out, list(range(4)), _process(calls), 2, {"p": 2})
    assert len(calls) == 2 and len(shards.shard_files(out)) == 2


def test_changed_code_drops_stale_shards(tmp_path, monkeypatch):
    """Shards written by other code are recomputed (DVC reruns the stage, the persisted shards must not
    survive); with the same code a rerun resumes."""
    calls = []
    out = tmp_path / "out"
    shards.write_shards(out, list(range(6)), _process(calls), 2, {"p": 1})
    calls.clear()
    shards.write_shards(out, list(range(6)), _process(calls), 2, {"p": 1})
    assert calls == []
    monkeypatch.setattr(shards, "source_fingerprint", lambda: "edited-code")
    shards.write_shards(out, list(range(6)), _process(calls), 2, {"p": 1})
    assert len(calls) == 3


def test_sources_digest_changes_with_any_source_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not code")
    base = shards.sources_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("edited, still not code")
    assert shards.sources_digest(tmp_path) == base
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    edited = shards.sources_digest(tmp_path)
    assert edited != base
    (tmp_path / "sub" / "b.py").rename(tmp_path / "b.py")
    assert shards.sources_digest(tmp_path) not in (base, edited)
    package = Path(shards.__file__).parent
    assert shards.source_fingerprint() == shards.sources_digest(package)


def test_ranks_write_disjoint_shards(tmp_path):
    out = tmp_path / "out"
    items = list(range(7))
    for rank in (0, 1):
        shards.write_shards(out, items, _process([]), 2, {}, rank=rank, world_size=2)
    assert sorted(shards.read_shards(out)["key"]) == items


def test_rle_round_trip_and_png(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = shards.rle_encode(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(shards.rle_decode(rle), mask)
    img = (rng.random((9, 11, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(shards.image_from_bytes(shards.png_bytes(img))), img)
    with pytest.raises(ValueError, match="expects an \\(H, W\\) mask"):
        shards.rle_encode(np.zeros((2, 2, 2)))


def test_missing_shard_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the stage that writes it"):
        shards.read_shards(tmp_path / "nope")


def test_other_ranks_wait_for_rank0_cleanup(tmp_path):
    """Rank 1 must not skip a stale shard that rank 0 is about to delete after a params change."""
    import threading

    out = tmp_path / "out"
    items = list(range(4))
    shards.write_shards(out, items, _process([]), 1, {"p": 1}, rank=0, world_size=2)
    shards.write_shards(out, items, _process([]), 1, {"p": 1}, rank=1, world_size=2)
    calls_rank1: list = []
    rank1 = threading.Thread(
        target=shards.write_shards, args=(out, items, _process(calls_rank1), 1, {"p": 2}),
        kwargs={"rank": 1, "world_size": 2},
    )
    rank1.start()
    rank1.join(timeout=0.5)
    assert rank1.is_alive() and calls_rank1 == []  # waiting: the fingerprint on disk is still the old one
    shards.write_shards(out, items, _process([]), 1, {"p": 2}, rank=0, world_size=2)
    rank1.join(timeout=10)
    assert calls_rank1 == [[1], [3]]  # rank 1 recomputed its shards instead of keeping stale ones
