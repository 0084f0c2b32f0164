"""The synthetic demo set: determinism, exact masks, captions that name every object, row schema."""

from __future__ import annotations

import json
import logging
import re
import runpy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pycocotools import mask as mask_utils

from pipeline.datasets import demo_images

from pipeline.datasets.demo_drawing import ACCENT, NOUNS, PALETTE
from pipeline.datasets.demo_images import (PLURALS, DemoImage, heldout_ids, image_id_of, render_image,
                                           write_demo_training_set)
from pipeline.datasets.demo_piebench import TABLE_COLOUR, render_edit_scene
from pipeline.datasets.demo_vocabulary import VOCABULARY
from pipeline.datasets.piebench_files import bracketed_words, strip_brackets
from pipeline.datasets.training_images import image_set_summary
from pipeline.store.codecs import decode_error, image_from_bytes
from pipeline.store.shards import read_shards, shard_files, shard_path

REPO = Path(__file__).resolve().parents[1]
SEED = 0
NUM = 48


def garble_image(path: Path, row: int) -> str:
    """Rewrite the shard at ``path`` as a valid Parquet file (schema metadata and page checksums kept) whose
    ``image`` cell ``row`` holds garbage after a PNG signature; returns that row's image id."""
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[row] = b"\x89PNG\r\n\x1a\n" + b"garbage " * 32
    index = table.schema.get_field_index("image")
    table = table.set_column(index, table.schema.field(index), pa.array(images, pa.binary()))
    pq.write_table(table, path, write_page_checksum=True)
    return table.column("image_id")[row].as_py()


@pytest.fixture(scope="module")
def images() -> list[DemoImage]:
    return [render_image(image_id_of(i), SEED, 128) for i in range(NUM)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("images") / "images"
    write_demo_training_set(out, NUM, 128, SEED, shard_size=16, heldout_fraction=0.125)
    return out


def _coco_decode(rle: dict) -> np.ndarray:
    """Decode with pycocotools directly (not through pipeline.shards)."""
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def test_same_seed_same_bytes(tmp_path, shard_dir):
    again = tmp_path / "again"
    write_demo_training_set(again, NUM, 128, SEED, shard_size=16, heldout_fraction=0.125)
    first, second = shard_files(shard_dir), shard_files(again)
    assert [f.name for f in first] == [f.name for f in second] == [f"part-0000{i}.parquet" for i in range(3)]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))


def test_image_depends_only_on_seed_and_id():
    a = render_image("demo00003", SEED, 128)
    b = render_image("demo00003", SEED, 128)
    c = render_image("demo00003", SEED + 1, 128)
    assert np.array_equal(a.pixels, b.pixels) and a.caption == b.caption
    assert not (a.pixels.shape == c.pixels.shape and np.array_equal(a.pixels, c.pixels))


def test_sizes_include_non_square(images):
    shapes = {im.pixels.shape for im in images}
    assert (128, 128, 3) in shapes and (128, 160, 3) in shapes and (160, 128, 3) in shapes
    assert shapes <= {(128, 128, 3), (128, 160, 3), (160, 128, 3)}


def test_true_masks_match_drawn_pixels(images):
    """Masks are derived independently from the pixels: non-background = some channel < 170."""
    accent = np.array(ACCENT)
    for im in images:
        px = im.pixels.astype(int)
        drawn = px.min(axis=2) < 170
        union = np.zeros(drawn.shape, bool)
        for obj in im.objects:
            assert obj.mask.any(), (im.image_id, obj.name)
            assert not (union & obj.mask).any(), f"{im.image_id}: masks overlap"
            union |= obj.mask
            body = (px == np.array(PALETTE[obj.colour])).all(axis=2)
            is_accent = (px == accent).all(axis=2)
            assert body.any()
            # every pixel of the body colour is in this object's mask (colours are distinct per image)
            assert not (body & ~obj.mask).any()
            # every mask pixel is body colour or accent; every non-accent mask pixel is body colour
            assert (body | is_accent)[obj.mask].all()
            assert np.array_equal(obj.mask & ~is_accent, body)
        assert np.array_equal(union, drawn), im.image_id
        # outside the objects each row has a single background colour
        for y in range(px.shape[0]):
            row = px[y][~union[y]]
            assert len(row) == 0 or (row == row[0]).all()


def test_captions_name_each_object_once(images):
    vocab = {w for words in VOCABULARY.values() for w in words}
    for im in images:
        words = re.findall(r"[a-z]+", im.caption.lower())
        assert set(words) <= vocab, (im.caption, set(words) - vocab)
        assert 2 <= len(im.objects) <= 4
        assert len({o.noun for o in im.objects}) == len(im.objects)
        for obj in im.objects:
            assert words.count(obj.name) == 1, (im.caption, obj.name)
            pos = words.index(obj.name)
            assert words[pos - 1] == obj.colour
            if obj.name != obj.noun:
                assert obj.name == PLURALS[obj.noun] and "two" in words[max(0, pos - 3):pos]
        assert im.caption[0].isupper() and im.caption.endswith(".")


def test_spatial_words_are_true(images):
    checked = 0
    for im in images:
        a, b = im.objects[0], im.objects[1]
        ya, yb = np.nonzero(a.mask)[0], np.nonzero(b.mask)[0]
        if f"{a.name} above" in im.caption:
            assert ya.max() < yb.min(), im.caption
            checked += 1
        if f"{a.name} below" in im.caption:
            assert ya.min() > yb.max(), im.caption
            checked += 1
    assert checked > 0


def test_rows_follow_the_contract(shard_dir, images):
    rows = read_shards(shard_dir)
    assert list(rows.columns) == ["image_id", "image", "caption", "split", "objects", "status", "error"]
    assert list(rows.image_id) == [image_id_of(i) for i in range(NUM)]
    assert (rows.status == "ok").all() and (rows.error == "").all()
    assert (rows.split == "heldout").sum() == 6 and (rows.split == "train").sum() == 42
    for row, im in zip(rows.itertuples(), images):
        assert np.array_equal(np.asarray(image_from_bytes(row.image)), im.pixels)
        assert row.caption == im.caption
        assert [o["name"] for o in row.objects] == [o.name for o in im.objects]
        for stored, obj in zip(row.objects, im.objects):
            assert list(stored["mask"]["size"]) == list(obj.mask.shape)
            assert np.array_equal(_coco_decode(stored["mask"]), obj.mask)


def test_summary_counts(shard_dir):
    summary = image_set_summary(shard_dir)
    rows = read_shards(shard_dir)
    assert summary == {"images": NUM, "ok": NUM, "failed": 0, "train": 42, "heldout": 6,
                       "objects": int(sum(len(o) for o in rows.objects))}


def test_a_shard_with_an_undecodable_png_is_drawn_again(tmp_path, shard_dir, monkeypatch, caplog):
    """Garbage in one ``image`` cell of a readable shard: the next run finds it by decoding, draws only that
    shard again, and the directory equals a clean run's byte for byte."""
    out = tmp_path / "images"
    write_demo_training_set(out, NUM, 128, SEED, shard_size=16, heldout_fraction=0.125)
    victim = garble_image(shard_path(out, 1), row=3)
    stored = read_shards(out).set_index("image_id")
    assert stored.loc[victim, "status"] == "ok" and decode_error(stored.loc[victim, "image"]) is not None
    drawn = []
    monkeypatch.setattr(demo_images, "render_image", lambda i, *a: drawn.append(i) or render_image(i, *a))
    with caplog.at_level(logging.WARNING, logger="pipeline.store.shards"):
        write_demo_training_set(out, NUM, 128, SEED, shard_size=16, heldout_fraction=0.125)
    assert drawn == [image_id_of(i) for i in range(16, 32)]
    assert f"part-00001.parquet is damaged (1 of 16 images in column 'image' do not decode ({victim}: " in caplog.text
    assert {p.name: p.read_bytes() for p in shard_files(out)} == {p.name: p.read_bytes() for p in shard_files(shard_dir)}


def test_train_data_stage_repairs_a_damaged_shard(tmp_path, monkeypatch):
    """End to end: `train_data` in a scratch project, one PNG garbled, the stage run again: the shard is
    repaired (its bytes and the metrics equal the first run's) and every image decodes."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = "demo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    out, metrics = tmp_path / "artifacts/data/images", tmp_path / "metrics/train_data.json"
    runpy.run_path(str(REPO / "stages" / "train_data.py"), run_name="__main__")
    clean, clean_metrics = {p.name: p.read_bytes() for p in shard_files(out)}, json.loads(metrics.read_text())
    victim = garble_image(out / "part-00002.parquet", row=0)
    assert decode_error(read_shards(out).set_index("image_id").loc[victim, "image"]) is not None
    runpy.run_path(str(REPO / "stages" / "train_data.py"), run_name="__main__")
    assert {p.name: p.read_bytes() for p in shard_files(out)} == clean
    assert json.loads(metrics.read_text()) == clean_metrics
    assert all(decode_error(image) is None for image in read_shards(out, columns=["image"])["image"])


def test_heldout_split():
    ids = [image_id_of(i) for i in range(48)]
    assert heldout_ids(ids, 0.125, 0) == heldout_ids(ids, 0.125, 0)
    assert len(heldout_ids(ids, 0.125, 0)) == 6
    assert heldout_ids(ids, 0.0, 0) == set()
    assert len(heldout_ids(ids[:3], 0.1, 0)) == 1
    with pytest.raises(ValueError, match="heldout_fraction"):
        heldout_ids(ids, 1.0, 0)


def test_changed_params_redraw(tmp_path):
    out = tmp_path / "images"
    write_demo_training_set(out, 4, 64, SEED, shard_size=2, heldout_fraction=0.0)
    small = read_shards(out)
    write_demo_training_set(out, 4, 96, SEED, shard_size=2, heldout_fraction=0.0)
    big = read_shards(out)
    assert min(image_from_bytes(small.image[0]).size) == 64
    assert min(image_from_bytes(big.image[0]).size) == 96


@pytest.mark.parametrize("index", range(6))
def test_edit_scene_mask_and_prompts(index):
    scene = render_edit_scene(index, SEED, 256)
    assert scene.pixels.shape == (256, 256, 3) and scene.mask.shape == (256, 256)
    px = scene.pixels.astype(int)
    source, target = bracketed_words(scene.original_prompt), bracketed_words(scene.editing_prompt)
    assert len(source) == len(target) == 1 and source != target
    words = strip_brackets(scene.original_prompt).split()
    colour, noun = words[1], words[2]
    body = (px == np.array(PALETTE[colour])).all(axis=2)
    is_accent = (px == np.array(ACCENT)).all(axis=2)
    assert np.array_equal(scene.mask & ~is_accent, body) and not (is_accent & ~scene.mask).any()
    table = (px == np.array(TABLE_COLOUR)).all(axis=2)
    assert table.any() and not (table & scene.mask).any()
    if scene.editing_type_id == "6":
        assert source == [colour] and target[0] in PALETTE and scene.blended_word == f"{noun} {noun}"
    else:
        assert scene.editing_type_id == "1" and source == [noun] and target[0] in NOUNS
        assert scene.blended_word == f"{noun} {target[0]}"
    assert strip_brackets(scene.editing_prompt).endswith("on a table")
