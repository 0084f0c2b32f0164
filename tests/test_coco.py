"""TokenCompose metadata (SPEC §2.7), authors' phrases as nouns rows, COCO image download into shards."""

from __future__ import annotations

import io
import json
import runpy
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import fetch
from pipeline.datasets.coco_images import split_of, write_coco_training_set
from pipeline.datasets.tokencompose_metadata import MetadataError, image_id_of, read_records, read_tokencompose_metadata
from pipeline.store.codecs import image_from_bytes
from pipeline.store.shards import STATUS_OK, read_shards, shard_files, write_table
from pipeline.text.align import CaptionTokens
from pipeline.text.authors_phrases import authors_nouns_row, authors_nouns_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metadata_path(shared_data) -> Path:
    return shared_data / "tokencompose" / "coco_gsam_metadata.jsonl"


@pytest.fixture(scope="module")
def records(metadata_path) -> list[dict]:
    return read_tokencompose_metadata(metadata_path)


class Server:
    """A local HTTP server on 127.0.0.1 serving ``root``; counts requests; ``flaky`` paths answer 503 once."""

    def __init__(self, root: Path, flaky: set[str] = frozenset()):
        self.requests: Counter[str] = Counter()
        self.flaky = set(flaky)
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                if name in server.flaky and server.requests[name] == 1:
                    self.send_error(503, "try again")
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _record(name: str, caption: str) -> dict:
    return {"file_name": name, "text": caption, "attn_list": [["cat", f"seg/{Path(name).stem}/mask.png"]]}


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A folder with 2 good JPEGs (RGB, grayscale), a corrupt file, a flaky file; one name is missing (404)."""
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.0)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    root = tmp_path / "train2017"
    root.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    gray = rng.integers(0, 255, (20, 16), dtype=np.uint8)
    (root / "000000000001.jpg").write_bytes(_jpeg(rgb))
    (root / "000000000002.jpg").write_bytes(_jpeg(gray))
    (root / "000000000003.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "000000000005.jpg").write_bytes(_jpeg(rgb[::-1]))
    records = [_record("000000000001.jpg", "A cat on a mat."), _record("000000000002.jpg", "A gray cat."),
               _record("000000000003.jpg", "A broken cat."), _record("000000000004.jpg", "A missing cat."),
               _record("000000000005.jpg", "A flaky cat.")]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with Server(root, flaky={"000000000005.jpg"}) as server:
        yield server, root, records


# --- metadata --------------------------------------------------------------------------------------

def test_shipped_metadata_counts_match_spec(records):
    pairs = [p for r in records for p in r["attn_list"]]
    assert len(records) == 4526
    assert len(pairs) == 15156
    assert sum(1 for _, mask in pairs if mask) == 13634
    assert image_id_of(records[0]["file_name"]) == "000000000142"


@pytest.mark.parametrize("line,message", [
    ('{"file_name": "a.jpg", "text": "x", "attn_list": [["cat", null]]', "malformed JSON"),
    ('{"file_name": "a.jpg", "attn_list": []}', "missing key 'text'"),
    ('{"file_name": "a.jpg", "text": "x", "attn_list": [["cat"]]}', "attn_list must be a list"),
    ('["a.jpg", "x"]', "expected a JSON object"),
    ('{"file_name": "a.jpg", "text": ["A cat.", "A kitten."], "attn_list": []}', "text is a list of captions"),
])
def test_malformed_metadata_names_the_line(tmp_path, line, message):
    good = json.dumps(_record("b.jpg", "A cat."))
    path = tmp_path / "metadata.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(MetadataError, match=f"{path}:3: {message}"):
        read_tokencompose_metadata(path)


@pytest.mark.parametrize("line,message", [
    ('{"file_name": "a.jpg", "text": "x", "attn_list": [["cat", null]]', "malformed JSON"),
    ('{"file_name": "a.jpg", "text": "x", "attn_list": [], "n": ' + "1" * 5000 + "}", "unreadable JSON"),
    ('{"file_name": "a.jpg", "attn_list": []}', "missing key 'text'"),
])
def test_keep_bad_turns_each_malformed_line_into_a_row_in_its_place(line, message):
    """The authors'-masks reading: a bad line becomes a ``bad_line`` row where it stood, with the message the
    strict reading raises; good lines around it are kept."""
    good = json.dumps(_record("b.jpg", "A cat."))
    rows = read_records(f"{good}\n{line}\n\n{good}\n", "m.jsonl", keep_bad=True)
    assert [r.get("bad_line") for r in rows] == [None, 2, None]
    assert rows[1]["error"].startswith(f"m.jsonl:2: {message}")
    with pytest.raises(MetadataError, match=f"m.jsonl:2: {message}"):
        read_records(f"{good}\n{line}\n", "m.jsonl")


@pytest.mark.parametrize("keep_bad", [False, True])
def test_metadata_without_records_is_an_error_either_way(keep_bad):
    with pytest.raises(MetadataError, match="empty.jsonl: no records"):
        read_records("\n  \n", "empty.jsonl", keep_bad=keep_bad)


def test_missing_metadata_file_is_a_clear_error(tmp_path):
    with pytest.raises(MetadataError, match="metadata file not found"):
        read_tokencompose_metadata(tmp_path / "nope.jsonl")


def test_metadata_from_a_url(served):
    server, _, records = served
    assert read_tokencompose_metadata(f"{server.url}/metadata.jsonl") == records
    with pytest.raises(MetadataError, match="HTTP 404"):
        read_tokencompose_metadata(f"{server.url}/missing.jsonl")


# --- authors' phrases as nouns rows ----------------------------------------------------------------

def test_authors_rows_align_every_phrase(records, clip_tokenizer):
    """All 15,156 words align, the 13,634 with a mask and the 1,522 without (Grounded-SAM may ground those)."""
    rows = [authors_nouns_row(r, clip_tokenizer, 76) for r in records]
    statuses = Counter((s, m is None) for row in rows for s, m in zip(row["phrase_status"], row["mask_paths"]))
    assert statuses == {("ok", False): 13634, ("ok", True): 1522}
    assert all(row["status"] == STATUS_OK for row in rows)  # every image has a masked phrase (SPEC §2.7)
    first = rows[0]
    assert first["image_id"] == "000000000142" and first["phrases"][-1] == "chocolate spread"
    assert first["mask_paths"] == [m for _, m in records[0]["attn_list"]]
    tokens = CaptionTokens.of(clip_tokenizer, first["caption"])
    spelled = "".join(clip_tokenizer.decode([tokens.ids[i - 1]]) for i in first["token_indices"][-1])
    assert spelled == "chocolatespread"


def test_authors_rows_join_on_image_id(records, clip_tokenizer):
    image_rows = [
        {"image_id": "000000000142", "caption": records[0]["text"], "status": "ok"},
        {"image_id": "000000000370", "caption": "Another caption.", "status": "ok"},
        {"image_id": "999999999999", "caption": "Not there.", "status": "ok"},
        {"image_id": "000000000397", "caption": records[2]["text"], "status": "decode_failed", "error": "bad"},
    ]
    rows = authors_nouns_rows(image_rows, records, clip_tokenizer, 76)
    assert [r["status"] for r in rows] == ["ok", "caption_mismatch", "not_in_metadata", "image_failed"]
    assert "999999999999" in rows[2]["error"] and "Another caption." in rows[1]["error"]
    assert all("mask_paths" in r for r in rows)


def test_nouns_stage_with_authors_phrases(tmp_path, monkeypatch, records):
    from pipeline.zoo.sd import save_clip_tokenizer

    subset = records[:5]
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in subset) + "\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = "demo"
    params["profiles"]["demo"]["text"].update(phrases="authors", metadata=str(meta))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    save_clip_tokenizer(tmp_path / "artifacts" / "models" / "tiny-sd" / "tokenizer")
    images = tmp_path / "artifacts" / "data" / "images"
    images.mkdir(parents=True)
    write_table([dict(image_id=image_id_of(r["file_name"]), image=b"", caption=r["text"], split="train",
                      objects=[], status="ok", error="") for r in subset], images / "part-00000.parquet")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(REPO / "stages" / "nouns.py"), run_name="__main__")
    df = read_shards(tmp_path / "artifacts" / "nouns")
    assert [list(p) for p in df["phrases"]] == [[w for w, _ in r["attn_list"]] for r in subset]
    metrics = json.loads((tmp_path / "metrics" / "nouns.json").read_text())
    unmasked = sum(1 for r in subset for _, m in r["attn_list"] if m is None)
    assert unmasked > 0 and metrics["phrases_source"] == "authors"
    assert metrics["aligned"] == sum(len(r["attn_list"]) for r in subset)  # with a mask or without


# --- COCO images -----------------------------------------------------------------------------------

def test_write_coco_training_set_fetches_checks_and_records_failures(served, tmp_path):
    server, root, _ = served
    out = tmp_path / "images"
    metrics = write_coco_training_set(f"{server.url}/metadata.jsonl", server.url + "/", out, shard_size=2,
                                      heldout_fraction=0.0, seed=0, retries=2, timeout=5.0)
    df = read_shards(out)
    assert df["image_id"].tolist() == ["000000000001", "000000000002", "000000000003", "000000000004",
                                       "000000000005"]
    assert df["status"].tolist() == ["ok", "ok", "decode_failed", "download_failed", "ok"]
    assert df.loc[0, "image"] == (root / "000000000001.jpg").read_bytes()  # RGB JPEG kept as is
    with Image.open(io.BytesIO(df.loc[1, "image"])) as stored:  # grayscale re-encoded as RGB PNG
        assert (stored.format, stored.mode) == ("PNG", "RGB")
    gray = np.asarray(image_from_bytes(df.loc[1, "image"]))
    assert gray.shape == (20, 16, 3) and (gray[..., 0] == gray[..., 2]).all()
    assert np.array_equal(gray[..., 0], np.asarray(Image.open(root / "000000000002.jpg")))
    assert f"{server.url}/000000000004.jpg: HTTP 404" in df.loc[3, "error"]
    assert f"{server.url}/000000000003.jpg" in df.loc[2, "error"] and df.loc[2, "image"] is None
    assert server.requests["000000000005.jpg"] == 2  # one 503, one retry
    assert server.requests["000000000004.jpg"] == 1  # a 404 is not retried
    assert df["caption"].tolist()[0] == "A cat on a mat." and set(df["split"]) == {"train"}
    assert metrics["images"] == 5 and metrics["ok"] == 3 and metrics["download_failed"] == 1
    assert metrics["decode_failed"] == 1 and metrics["metadata_records"] == 5 and metrics["train"] == 3


def _fetch_args(server, root: Path, out: Path, shard_size: int, retries: int) -> dict:
    """Arguments of write_coco_training_set for the served metadata: no held-out split, seed 0."""
    return dict(metadata=str(root / "metadata.jsonl"), image_base_url=server.url, out_dir=out, shard_size=shard_size,
                heldout_fraction=0.0, seed=0, retries=retries, timeout=5.0)


def test_write_coco_training_set_resumes_and_refetches_failed_downloads(served, tmp_path):
    server, root, _ = served
    out = tmp_path / "images"
    args = _fetch_args(server, root, out, shard_size=2, retries=0)
    write_coco_training_set(**args)
    first = {p.name: p.read_bytes() for p in shard_files(out)}
    assert read_shards(out)["status"].tolist()[4] == "download_failed"  # flaky and no retries
    (root / "000000000004.jpg").write_bytes((root / "000000000001.jpg").read_bytes())  # now served
    before = server.requests.copy()
    write_coco_training_set(**args)
    fetched = server.requests - before
    assert set(fetched) == {"000000000003.jpg", "000000000004.jpg", "000000000005.jpg"}  # shards 1 and 2 redone
    assert (out / "part-00000.parquet").read_bytes() == first["part-00000.parquet"]
    assert read_shards(out)["status"].tolist() == ["ok", "ok", "decode_failed", "ok", "ok"]


def test_a_downloaded_image_damaged_in_its_shard_is_fetched_again(served, tmp_path, caplog):
    """An ``ok`` image whose stored bytes no longer decode (the shard itself still reads): a rerun fetches
    that shard's images again and the directory equals the first run's byte for byte."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    server, root, _ = served
    out = tmp_path / "images"
    args = _fetch_args(server, root, out, shard_size=2, retries=2)
    write_coco_training_set(**args)
    first = {p.name: p.read_bytes() for p in shard_files(out)}
    path = out / "part-00000.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[1] = images[1][: len(images[1]) // 3]  # status stays ok
    index = table.schema.get_field_index("image")
    pq.write_table(table.set_column(index, table.schema.field(index), pa.array(images, pa.binary())), path)
    before = server.requests.copy()
    with caplog.at_level(logging.WARNING, logger="pipeline.store.shards"):
        write_coco_training_set(**args)
    fetched = set(server.requests - before)  # shard 0 repaired, shard 1 retries its 404 as always, shard 2 kept
    assert fetched == {"000000000001.jpg", "000000000002.jpg", "000000000003.jpg", "000000000004.jpg"}
    assert "part-00000.parquet is damaged (1 of 2 images in column 'image' do not decode (000000000002: " in caplog.text
    assert {p.name: p.read_bytes() for p in shard_files(out)} == first


def test_heldout_split_is_seeded_per_image():
    ids = [f"{i:012d}" for i in range(2000)]
    splits = [split_of(i, 0.25, seed=3) for i in ids]
    assert 0.22 < splits.count("heldout") / len(ids) < 0.28
    assert splits == [split_of(i, 0.25, seed=3) for i in ids]
    assert splits != [split_of(i, 0.25, seed=4) for i in ids]
    assert set(split_of(i, 0.0, seed=3) for i in ids) == {"train"}


def test_fetch_gives_up_after_retries_naming_the_url(monkeypatch):
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.0)
    with pytest.raises(fetch.FetchError, match=r"http://127\.0\.0\.1:9/x\.jpg"):
        fetch.fetch("http://127.0.0.1:9/x.jpg", retries=1, timeout=2.0)


def test_unreachable_image_source_stops_after_the_first_images(served, tmp_path, monkeypatch):
    """All of the first 16 downloads failing (no network, wrong base URL) stops the run at once instead of
    trying thousands of images; nothing is written for the unfinished shard."""
    server, root, _ = served
    records = [_record(f"{i:012d}.jpg", f"A cat number {i}.") for i in range(100, 140)]
    (root / "many.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "images"
    with pytest.raises(fetch.FetchError, match=r"first 16 COCO images all failed to download from .*HTTP 404"):
        write_coco_training_set(str(root / "many.jsonl"), server.url, out, shard_size=40,
                                heldout_fraction=0.0, seed=0, retries=0, timeout=5.0)
    assert sum(server.requests.values()) == 16 and not shard_files(out)


def test_unknown_host_and_missing_local_file_are_not_retried(monkeypatch, tmp_path):
    import socket
    import urllib.error
    import urllib.request

    calls = []

    def no_dns(url, timeout):
        calls.append(url)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_dns)
    with pytest.raises(fetch.FetchError, match="Name or service not known") as err:
        fetch.fetch("http://images.example/x.jpg", retries=3)
    assert not err.value.transient and len(calls) == 1
    calls.clear()
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.0)

    def dns_blip(url, timeout):
        calls.append(url)
        raise urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", dns_blip)
    with pytest.raises(fetch.FetchError, match="Temporary failure") as err:
        fetch.fetch("http://images.example/x.jpg", retries=2)
    assert err.value.transient and len(calls) == 3  # a temporary resolver failure is retried
    monkeypatch.undo()
    with pytest.raises(fetch.FetchError) as err:
        fetch.fetch((tmp_path / "absent.jpg").as_uri(), retries=3)
    assert not err.value.transient


# --- verified downloads: metadata SHA-256, COCO over https, a digest per image ----------------------

def test_pinned_metadata_sha256_is_that_of_the_real_file(metadata_path):
    """The paper profile pins the SHA-256 of TokenCompose's metadata file (the file at the pinned URL, of
    which ../shared/data holds a copy) in both places that read it, and fetches COCO over https."""
    from pipeline.datasets.coco_images import DEFAULT_IMAGE_BASE_URL
    from pipeline.datasets.tokencompose_metadata import TOKENCOMPOSE_METADATA_SHA256, TOKENCOMPOSE_METADATA_URL

    paper = yaml.safe_load((REPO / "params.yaml").read_text())["profiles"]["paper"]
    assert fetch.sha256_bytes(metadata_path.read_bytes()) == TOKENCOMPOSE_METADATA_SHA256
    assert paper["text"]["metadata"] == paper["data"]["tokencompose_metadata"] == TOKENCOMPOSE_METADATA_URL
    assert paper["text"]["metadata_sha256"] == paper["data"]["tokencompose_metadata_sha256"] \
        == TOKENCOMPOSE_METADATA_SHA256
    assert paper["data"]["image_base_url"] == DEFAULT_IMAGE_BASE_URL == "https://images.cocodataset.org/train2017/"


def test_metadata_is_checked_against_its_sha256(served, caplog):
    server, root, records = served
    url = f"{server.url}/metadata.jsonl"
    digest = fetch.sha256_bytes((root / "metadata.jsonl").read_bytes())
    assert read_tokencompose_metadata(url, sha256=digest) == records
    with pytest.raises(fetch.HashMismatchError, match=f"expected {'0' * 64}, got {digest}.*the.pin.key"):
        read_tokencompose_metadata(url, sha256="0" * 64, param="the.pin.key")
    with caplog.at_level("WARNING", logger="pipeline.fetch"):
        assert read_tokencompose_metadata(url) == records  # null: read unchecked, with a warning for a URL
    assert f"{url}: read without a SHA-256 check" in caplog.text
    with pytest.raises(fetch.HashMismatchError):
        write_coco_training_set(url, server.url, root / "out", 2, 0.0, 0, metadata_sha256="f" * 64)
    assert not (root / "out").exists()  # nothing fetched before the metadata was verified


def test_train_data_params_refuse_a_malformed_sha256():
    from pipeline.config import ConfigError, parse

    from stages.train_data import TrainDataScale
    base = {"source": "coco", "shard_size": 2, "heldout_fraction": 0.0}
    assert parse(TrainDataScale, base, "profiles.paper.data").tokencompose_metadata_sha256 is None
    with pytest.raises(ConfigError, match="profiles.paper.data: tokencompose_metadata_sha256: 'not-a-hash' is not"):
        parse(TrainDataScale, {**base, "tokencompose_metadata_sha256": "not-a-hash"}, "profiles.paper.data")


def test_each_image_row_records_the_sha256_of_the_downloaded_bytes(served, tmp_path):
    server, root, _ = served
    out = tmp_path / "images"
    write_coco_training_set(str(root / "metadata.jsonl"), server.url, out, shard_size=2, heldout_fraction=0.0,
                            seed=0, retries=2, timeout=5.0)
    df = read_shards(out)
    served_digest = {f"{i:012d}": fetch.sha256_bytes((root / f"{i:012d}.jpg").read_bytes()) for i in (1, 2, 3, 5)}
    assert dict(zip(df["image_id"], df["image_sha256"])) == {**served_digest, "000000000004": ""}
    assert df.loc[1, "image"] != (root / "000000000002.jpg").read_bytes()  # re-encoded; the digest is the served file's


def test_an_image_changed_upstream_stops_the_rerun_that_fetches_it_again(served, tmp_path):
    """A rerun fetches the shard with a failed download again; an image in it whose served bytes changed is an
    error naming the image, both digests, the shard and the way to accept it, and nothing is mixed in."""
    from pipeline.datasets.coco_images import ChangedUpstreamError

    server, root, _ = served
    out = tmp_path / "images"
    args = _fetch_args(server, root, out, shard_size=5, retries=0)
    write_coco_training_set(**args)  # one shard; 4 is missing and 5 flaky: it is fetched again on a rerun
    old = read_shards(out)
    before = fetch.sha256_bytes((root / "000000000001.jpg").read_bytes())
    (root / "000000000001.jpg").write_bytes(_jpeg(np.full((24, 32, 3), 7, dtype=np.uint8)))  # replaced upstream
    after = fetch.sha256_bytes((root / "000000000001.jpg").read_bytes())
    with pytest.raises(ChangedUpstreamError) as err:
        write_coco_training_set(**args)
    message = str(err.value)
    assert f"image 000000000001: {server.url}/000000000001.jpg now has SHA-256 {after}" in message
    assert f"{out / 'part-00000.parquet'} recorded {before}" in message and "delete" in message
    assert read_shards(out).equals(old)  # the shard of the earlier run is kept as it was
    (out / "part-00000.parquet").unlink()  # accepting the new file, as the message says
    write_coco_training_set(**args)
    df = read_shards(out)
    assert df.loc[0, "image_sha256"] == after and df.loc[0, "image"] == (root / "000000000001.jpg").read_bytes()


def test_a_rerun_with_unchanged_images_passes_the_check(served, tmp_path):
    server, root, _ = served
    out = tmp_path / "images"
    args = _fetch_args(server, root, out, shard_size=5, retries=0)
    write_coco_training_set(**args)
    before = server.requests.copy()
    write_coco_training_set(**args)
    assert server.requests - before == Counter({f"{i:012d}.jpg": 1 for i in range(1, 6)})  # all fetched again
    assert read_shards(out)["status"].tolist() == ["ok", "ok", "decode_failed", "download_failed", "ok"]
