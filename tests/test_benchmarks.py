"""MultiGen prompt files (SPEC §3.1) and the PIE-Bench format (SPEC §5.1-5.3)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import runpy
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import fetch
from pipeline.datasets import categories as category_lists
from pipeline.datasets import multigen_files, multigen_source, piebench_files
from pipeline.datasets.demo_piebench import render_edit_scene, write_demo_piebench
from pipeline.safe_paths import UnsafePathError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = re.compile(r"^a photo of a ([a-z ]+), a ([a-z ]+), a ([a-z ]+), a ([a-z ]+), and a ([a-z ]+)\.$")
OFFICIAL_SHA = {  # also in params.yaml profiles.paper.prompts.files
    "coco": "fdac55817fbab0dc3710e60b82a8b238e41a1ed771660b6050e27ba96dea35cd",
    "ade20k": "5e30e03d4ce55c2d5bc99e40976ff392c79a8ff5e3f374188b3748da5ad52618",
}


def official(shared_data: Path, name: str) -> Path:
    return shared_data / "multigen" / multigen_files.OFFICIAL_FILES[name]


def check_follows_spec(entries: list[dict], categories: set[str]) -> None:
    """SPEC §3.1, checked with a regex independent of multigen_files.multigen_text."""
    for index, entry in enumerate(entries):
        assert list(entry) == list(multigen_files.MULTIGEN_FIELDS)
        assert entry["unique_id"] == index and entry["num_objects"] == 5
        match = TEMPLATE.match(entry["text"])
        assert match, entry["text"]
        objects = [entry[f"obj_{i}_attributes"] for i in range(1, 6)]
        assert all(isinstance(o, list) and len(o) == 1 for o in objects)
        names = [o[0] for o in objects]
        assert list(match.groups()) == names
        assert len(set(names)) == 5 and set(names) <= categories


# --- category lists ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count,multi_word", [("coco", 80, 15), ("ade20k", 100, 11)])
def test_category_lists_match_official_files(shared_data, name, count, multi_word):
    data = json.loads(official(shared_data, name).read_text())
    used = {e[f"obj_{i}_attributes"][0] for e in data for i in range(1, 6)}
    names = category_lists.load_categories(name)
    assert len(names) == count and set(names) == used
    assert sum(" " in n for n in names) == multi_word


def test_coco_list_in_category_id_order():
    names = category_lists.load_categories("coco")
    assert names[:5] == ["person", "bicycle", "car", "motorcycle", "airplane"]
    assert names[-3:] == ["teddy bear", "hair drier", "toothbrush"]


# --- generator and parser ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", multigen_files.MULTIGEN_SETS)
def test_generator_follows_official_template(name):
    categories = category_lists.load_categories(name)
    entries = multigen_source.generate_multigen(categories, 300, seed=0, set_name=name)
    check_follows_spec(entries, set(categories))
    assert multigen_source.generate_multigen(categories, 300, 0, name) == entries
    assert multigen_source.generate_multigen(categories, 10, 0, name) == entries[:10]  # prompt i depends only on i
    assert multigen_source.generate_multigen(categories, 10, 1, name) != entries[:10]
    assert multigen_files.validate_multigen(entries, "generated", categories=categories) is entries


def test_generated_file_bytes_are_deterministic(tmp_path):
    categories = category_lists.load_categories("coco")
    multigen_files.write_multigen(multigen_source.generate_multigen(categories, 6, 0, "coco"), tmp_path / "a.json")
    multigen_files.write_multigen(multigen_source.generate_multigen(categories, 6, 0, "coco"), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_spec_example_prompt():
    objects = ["book", "cup", "kite", "mouse", "surfboard"]
    assert multigen_files.multigen_text(objects) == "a photo of a book, a cup, a kite, a mouse, and a surfboard."


@pytest.mark.parametrize("name", multigen_files.MULTIGEN_SETS)
def test_parser_reads_official_files(shared_data, name):
    path = official(shared_data, name)
    entries = multigen_files.read_multigen(path)
    assert len(entries) == 1000
    check_follows_spec(entries, set(category_lists.load_categories(name)))
    assert multigen_files.multigen_json(entries) == path.read_bytes()  # our writer reproduces the official bytes
    assert fetch.sha256_bytes(path.read_bytes()) == OFFICIAL_SHA[name]


def test_official_first_prompts_match_spec(shared_data):
    coco = multigen_files.read_multigen(official(shared_data, "coco"))
    assert multigen_files.prompt_objects(coco[0]) == ["book", "cup", "kite", "mouse", "surfboard"]
    assert multigen_files.prompt_objects(coco[1]) == ["wine glass", "skateboard", "refrigerator", "boat", "vase"]


def _good_entry() -> dict:
    return multigen_source.generate_multigen(category_lists.load_categories("coco"), 1, 0, "coco")[0]


@pytest.mark.parametrize("mutate,message", [
    (lambda e: e.pop("text"), r"entry 0: missing field 'text'"),
    (lambda e: e.update(unique_id=3), r"entry 0: field 'unique_id' is 3, expected 0"),
    (lambda e: e.update(num_objects=4), r"entry 0: field 'num_objects'"),
    (lambda e: e.update(obj_2_attributes=[]), r"entry 0: field 'obj_2_attributes'"),
    (lambda e: e.update(obj_2_attributes=e["obj_1_attributes"]), r"entry 0: objects are not distinct"),
    (lambda e: e.update(text="A photo of things."), r"entry 0: field 'text' .* does not follow the template"),
])
def test_parser_errors_name_entry_and_field(mutate, message):
    entry = _good_entry()
    mutate(entry)
    with pytest.raises(multigen_files.BenchmarkFormatError, match=message):
        multigen_files.validate_multigen([entry], "prompts.json")


def test_parser_rejects_non_list_and_unknown_category(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"a": 1}')
    with pytest.raises(multigen_files.BenchmarkFormatError, match="expected a JSON list"):
        multigen_files.read_multigen(path)
    entry = _good_entry()
    with pytest.raises(multigen_files.BenchmarkFormatError, match="not in the category list"):
        multigen_files.validate_multigen([entry], "x", categories=category_lists.load_categories("ade20k")[:5])


# --- fetching ---------------------------------------------------------------------------------------

@pytest.fixture()
def http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_fetch_via_local_server(shared_data, http_root, tmp_path):
    www, base = http_root
    shutil.copyfile(official(shared_data, "coco"), www / "coco.json")
    cfg = multigen_source.PromptsScale("official", {"coco": multigen_source.PromptFile(f"{base}/coco.json", OFFICIAL_SHA["coco"])})
    dest = tmp_path / "out" / "coco.json"
    entries = multigen_source.prepare_multigen_set(cfg, "coco", 0, 6, dest)
    assert len(entries) == 1000
    assert dest.read_bytes() == official(shared_data, "coco").read_bytes()


def test_fetch_hash_mismatch_names_expected_and_got(http_root, tmp_path):
    www, base = http_root
    (www / "coco.json").write_text("[]")
    cfg = multigen_source.PromptsScale("official", {"coco": multigen_source.PromptFile(f"{base}/coco.json", OFFICIAL_SHA["coco"])})
    got = fetch.sha256_bytes(b"[]")
    with pytest.raises(fetch.HashMismatchError, match=f"expected {OFFICIAL_SHA['coco']}, got {got}"):
        multigen_source.prepare_multigen_set(cfg, "coco", 0, 6, tmp_path / "coco.json")
    assert not (tmp_path / "coco.json").exists()


def test_fetch_missing_url_and_path(http_root, tmp_path):
    _, base = http_root
    with pytest.raises(OSError, match=r"coco\.json: download failed"):
        fetch.read_verified(f"{base}/coco.json", "0" * 64)
    with pytest.raises(FileNotFoundError, match="file not found"):
        fetch.read_verified(str(tmp_path / "nothing.json"), "0" * 64)


def test_fetch_local_path_and_invalid_content(shared_data, tmp_path):
    path = official(shared_data, "ade20k")
    cfg = multigen_source.PromptsScale("official", {"ade20k": multigen_source.PromptFile(str(path), OFFICIAL_SHA["ade20k"])})
    assert len(multigen_source.prepare_multigen_set(cfg, "ade20k", 0, 6, tmp_path / "a.json")) == 1000
    bad = tmp_path / "bad.json"
    bad.write_text('[{"unique_id": 0}]')
    cfg = multigen_source.PromptsScale("official", {"ade20k": multigen_source.PromptFile(str(bad), fetch.sha256_bytes(bad.read_bytes()))})
    with pytest.raises(multigen_files.BenchmarkFormatError, match="entry 0: missing field 'num_objects'"):
        multigen_source.prepare_multigen_set(cfg, "ade20k", 0, 6, tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists()


# --- PIE-Bench masks --------------------------------------------------------------------------------

def reference_decode(rle: list[int], size: int) -> np.ndarray:
    """SPEC §5.3 written as a plain loop over pairs, for comparison."""
    total = size * size
    flat = np.zeros(total, np.uint8)
    for i in range(0, len(rle), 2):
        start, length = rle[i], rle[i + 1]
        for j in range(min(length, total - start)):
            flat[start + j] = 1
    mask = flat.reshape(size, size)
    mask[0, :] = mask[-1, :] = 1
    mask[:, 0] = mask[:, -1] = 1
    return mask


def test_spec_4x4_example():
    raw = piebench_files.decode_mask([5, 3], size=4, force_border=False)
    assert np.array_equal(np.argwhere(raw), [[1, 1], [1, 2], [1, 3]])
    mask = piebench_files.decode_mask([5, 3], size=4)
    expected = np.ones((4, 4), np.uint8)
    expected[2, 1] = expected[2, 2] = 0
    assert np.array_equal(mask, expected)


def test_decode_clamps_overflow_and_matches_reference():
    rng = np.random.default_rng(0)
    for size in (4, 9, 32):
        total = size * size
        for _ in range(50):
            n = int(rng.integers(0, 6))
            starts = rng.integers(0, total + 3, n)  # some starts past the end
            lengths = rng.integers(0, total // 2 + 2, n)  # overlaps and overflow
            rle = np.stack([starts, lengths], 1).reshape(-1).tolist()
            assert np.array_equal(piebench_files.decode_mask(rle, size), reference_decode(rle, size))


@pytest.mark.parametrize("size", [4, 16, 64, 512])
def test_encode_decode_round_trip(size):
    rng = np.random.default_rng(size)
    for density in (0.0, 0.05, 0.5, 1.0):
        mask = rng.random((size, size)) < density
        rle = piebench_files.encode_mask(mask)
        assert len(rle) % 2 == 0 and all(isinstance(v, int) for v in rle)
        assert np.array_equal(piebench_files.decode_mask(rle, size, force_border=False), mask)
        bordered = mask.copy()
        bordered[[0, -1], :] = True
        bordered[:, [0, -1]] = True
        assert np.array_equal(piebench_files.decode_mask(rle, size).astype(bool), bordered)


def test_encode_is_row_major_starts_and_lengths():
    mask = np.zeros((4, 4), bool)
    mask[1, 1:] = True
    mask[2, 0] = True  # continues the run of row 1 in row-major order
    mask[3, 2] = True
    assert piebench_files.encode_mask(mask) == [5, 4, 14, 1]


def test_decode_rejects_odd_length():
    with pytest.raises(piebench_files.PieBenchFormatError, match="odd length"):
        piebench_files.decode_mask([1, 2, 3], size=4)


# --- PIE-Bench prompts and mapping ------------------------------------------------------------------

def test_bracket_stripping_and_words():
    prompt = "a slanted [rusty] mountain bicycle on the road in front of a building"
    assert piebench_files.strip_brackets(prompt) == "a slanted rusty mountain bicycle on the road in front of a building"
    assert piebench_files.bracketed_words("a [red] [wooden] cat") == ["red", "wooden"]
    assert piebench_files.strip_brackets("[a] [b c]") == "a b c"


def test_blended_word_split():
    assert piebench_files.split_blended_word("bicycle bicycle") == ("bicycle", "bicycle")
    assert piebench_files.split_blended_word("cat dog") == ("cat", "dog")
    assert piebench_files.split_blended_word("") is None
    with pytest.raises(piebench_files.PieBenchFormatError, match="blended_word 'cat'"):
        piebench_files.split_blended_word("cat")


def test_editing_types_follow_spec():
    counts = {k: int(v[0].rsplit("_", 1)[1]) for k, v in piebench_files.EDITING_TYPES.items()}
    assert sum(counts.values()) == 700 and counts["0"] == 140 and counts["6"] == 40
    assert all(v[0].startswith(f"{k}_") for k, v in piebench_files.EDITING_TYPES.items())


def _entry(**changes) -> dict:
    value = {"image_path": "0_random_140/000000000000.jpg", "original_prompt": "a cat",
             "editing_prompt": "a [dog]", "editing_instruction": "Make it a dog", "editing_type_id": "0",
             "blended_word": "cat dog", "mask": [0, 4]}
    value.update(changes)
    return value


@pytest.mark.parametrize("key,value,message", [
    ("000000000000", _entry(editing_type_id="10"), "field 'editing_type_id' is '10'"),
    ("000000000000", _entry(mask=[1, 2, 3]), "field 'mask' must be pairs"),
    ("000000000000", _entry(mask="1 2"), "field 'mask' must be a list"),
    ("000000000000", {k: v for k, v in _entry().items() if k != "editing_prompt"}, "missing field 'editing_prompt'"),
    ("000000000000", _entry(blended_word="cat"), "field blended_word 'cat'"),
    ("12", _entry(), "12-digit"),
])
def test_mapping_errors_name_entry_and_field(key, value, message):
    with pytest.raises(piebench_files.PieBenchFormatError, match=message):
        piebench_files.parse_entry(key, value, "mapping_file.json")


def test_demo_piebench_layout(tmp_path):
    out = tmp_path / "piebench"
    entries = write_demo_piebench(out, 4, seed=0, size=512)
    assert len(entries) == 4
    assert piebench_files.read_mapping(out / "mapping_file.json") == entries
    for image_id, entry in entries.items():
        assert len(image_id) == 12 and image_id[0] == entry.editing_type_id
        assert entry.image_path.startswith(piebench_files.EDITING_TYPES[entry.editing_type_id][0] + "/")
        image = Image.open(out / "annotation_images" / entry.image_path)
        assert image.format == "JPEG" and image.size == (512, 512) and image.mode == "RGB"
    scenes = [render_edit_scene(i, 0, 512) for i in range(4)]
    for entry, scene in zip(entries.values(), scenes):
        assert np.array_equal(piebench_files.decode_mask(entry.mask, 512, force_border=False).astype(bool), scene.mask)
        assert entry.original_prompt == scene.original_prompt
    summary = piebench_files.piebench_summary(entries)
    assert summary["entries"] == 4 and summary["type_6"] == 2 and summary["type_1"] == 2
    assert 0 < summary["mean_mask_fraction"] < 1


def test_copy_piebench_validates_and_copies(tmp_path):
    root = tmp_path / "PIE-Bench"
    written = write_demo_piebench(root, 2, seed=0, size=512)
    out = tmp_path / "out"
    assert piebench_files.copy_piebench(root, out) == (written, [])
    assert (out / "mapping_file.json").read_bytes() == (root / "mapping_file.json").read_bytes()
    for entry in written.values():
        rel = Path("annotation_images") / entry.image_path
        assert (out / rel).read_bytes() == (root / rel).read_bytes()


def test_piebench_copy_of_another_size_is_refused(tmp_path):
    """The masks' RLE indexes a 512x512 grid; a resized copy would decode to wrong masks without error."""
    root = tmp_path / "PIE-Bench"
    write_demo_piebench(root, 2, seed=0, size=768)
    with pytest.raises(ValueError, match=r"2 images are not 512x512 .* is 768x768.*resized copy"):
        piebench_files.copy_piebench(root, tmp_path / "out")


def test_piebench_unreadable_image_is_named(tmp_path):
    root = tmp_path / "PIE-Bench"
    entries = write_demo_piebench(root, 2, seed=0, size=512)
    damaged = root / "annotation_images" / next(iter(entries.values())).image_path
    damaged.write_bytes(b"")
    with pytest.raises(piebench_files.PieBenchFormatError, match=rf"{damaged.name}: not a readable image.*replace it"):
        piebench_files.validate_piebench_root(root)


def test_piebench_truncated_jpeg_is_refused(tmp_path):
    """``Image.verify`` passes a JPEG cut short; every pixel is decoded, so the copy stage refuses it."""
    root = tmp_path / "PIE-Bench"
    entries = write_demo_piebench(root, 2, seed=0, size=512)
    damaged = root / "annotation_images" / next(iter(entries.values())).image_path
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 4])
    with pytest.raises(piebench_files.PieBenchFormatError, match=rf"{damaged.name}: not a readable image"):
        piebench_files.validate_piebench_root(root)


def test_piebench_missing_root_and_images(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"PIE-Bench.*not found.*PnPInversion"):
        piebench_files.validate_piebench_root(tmp_path / "PIE-Bench")
    root = tmp_path / "pb"
    entries = write_demo_piebench(root, 2, seed=0, size=64)
    first = next(iter(entries.values()))
    (root / "annotation_images" / first.image_path).unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of 2 images .*{re.escape(first.image_path)}.*PnPInversion"):
        piebench_files.validate_piebench_root(root)


def _snapshot(folder: Path, skip: Path) -> dict[str, tuple[int, int] | None]:
    """Everything under ``folder`` except ``skip`` and what it holds: relative path -> (size, mtime_ns) of a
    file or link, None for a folder (creating ``skip`` changes its parent's mtime)."""
    found = {}
    for path in folder.rglob("*"):
        if skip != path and skip not in path.parents:
            info = path.lstat()
            found[str(path.relative_to(folder))] = None if path.is_dir() and not path.is_symlink() else (
                info.st_size, info.st_mtime_ns)
    return found


def _hostile_piebench(tmp_path: Path) -> tuple[Path, dict, dict[str, str]]:
    """A demo PIE-Bench copy with four good entries plus four hostile ones; a bait image lies outside it.

    Returns the root, the good entries and the expected reason of each hostile image id.
    """
    root = tmp_path / "PIE-Bench"
    good = write_demo_piebench(root, 4, seed=0, size=512)
    bait = tmp_path / "outside" / "x.jpg"
    bait.parent.mkdir()
    shutil.copyfile(root / "annotation_images" / next(iter(good.values())).image_path, bait)
    os.symlink(bait, root / "annotation_images" / "linked.jpg")
    template = json.loads((root / "mapping_file.json").read_text())[next(iter(good))]
    hostile = {
        "900000000001": ({"image_path": "../../outside/x.jpg"}, "parent_escape"),  # the bait itself
        "900000000002": ({"image_path": str(bait)}, "absolute_path"),
        "900000000003": ({"image_path": "linked.jpg"}, "symlink_escape"),
        "900000000004": ({"mask": [10, 5, 512 * 512, 3]}, "mask_out_of_frame"),
    }
    mapping = json.loads((root / "mapping_file.json").read_text())
    mapping.update({image_id: {**template, **change} for image_id, (change, _) in hostile.items()})
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root, good, {image_id: reason for image_id, (_, reason) in hostile.items()}


def test_hostile_piebench_entries_are_left_out_and_nothing_escapes(tmp_path):
    root, good, reasons = _hostile_piebench(tmp_path)
    out = tmp_path / "work" / "out"  # its '../../outside/x.jpg' would be work/outside/x.jpg
    out.parent.mkdir()
    before = _snapshot(tmp_path, out)
    entries, rejected = piebench_files.copy_piebench(root, out)
    assert dict(rejected) == reasons and len(rejected) == 4
    assert entries == good
    assert _snapshot(tmp_path, out) == before  # nothing written (or touched) outside the output folder
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert copied == sorted(["mapping_file.json"] + [f"annotation_images/{e.image_path}" for e in good.values()])
    for entry in good.values():
        rel = Path("annotation_images") / entry.image_path
        assert (out / rel).read_bytes() == (root / rel).read_bytes()
    assert piebench_files.read_mapping(out / "mapping_file.json") == good
    summary = piebench_files.rejected_summary(rejected)
    assert summary["bad_input"] == 4 and summary["bad_input_parent_escape"] == 1
    assert summary["bad_input_mask_out_of_frame"] == 1 and summary["bad_input_empty_name"] == 0


def test_piebench_with_only_hostile_entries_is_refused(tmp_path):
    root, good, _ = _hostile_piebench(tmp_path)
    mapping = json.loads((root / "mapping_file.json").read_text())
    (root / "mapping_file.json").write_text(json.dumps({k: v for k, v in mapping.items() if k not in good}))
    with pytest.raises(piebench_files.PieBenchFormatError, match=r"all 4 entries are unusable.*stay inside"):
        piebench_files.copy_piebench(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_example_refuses_unsafe_paths_and_masks_past_the_frame(tmp_path):
    root, good, _ = _hostile_piebench(tmp_path)
    mapping = piebench_files.read_mapping(root / "mapping_file.json")
    for image_id, rule in [("900000000001", "parent_escape"), ("900000000002", "absolute_path"),
                           ("900000000003", "symlink_escape")]:
        with pytest.raises(UnsafePathError) as info:
            piebench_files.load_example(root, mapping[image_id])
        assert info.value.rule == rule and isinstance(info.value, ValueError)
    with pytest.raises(piebench_files.PieBenchFormatError, match="past a 512x512 grid"):
        piebench_files.load_example(root, mapping["900000000004"])
    image, mask = piebench_files.load_example(root, mapping[next(iter(good))])
    assert image.shape == (512, 512, 3) and mask.shape == (512, 512)


# --- the stages in a scratch working directory ------------------------------------------------------

def _run_stage(name: str, workdir: Path, params: dict) -> dict:
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        runpy.run_path(str(REPO / "stages" / f"{name}.py"), run_name="__main__")
    finally:
        os.chdir(cwd)
    return json.loads((workdir / "metrics" / f"{name}.json").read_text())


def _params(profile: str) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = profile
    return params


def test_prompts_stage_demo(tmp_path):
    metrics = _run_stage("prompts", tmp_path, _params("demo"))
    assert metrics["coco_prompts"] == metrics["ade20k_prompts"] == 6
    for name in multigen_files.MULTIGEN_SETS:
        entries = multigen_files.read_multigen(tmp_path / "artifacts/data/multigen" / f"{name}.json")
        check_follows_spec(entries, set(category_lists.load_categories(name)))


def test_prompts_stage_paper_fetches_official_files(shared_data, http_root, tmp_path):
    www, base = http_root
    params = _params("paper")
    for name in multigen_files.MULTIGEN_SETS:
        shutil.copyfile(official(shared_data, name), www / f"{name}.json")
        spec = params["profiles"]["paper"]["prompts"]["files"][name]
        assert spec["sha256"] == OFFICIAL_SHA[name]
        assert spec["url"].endswith(f"5633f816116fdf7de74d9055ff9666c5222416e2/multigen/{multigen_files.OFFICIAL_FILES[name]}")
        spec["url"] = f"{base}/{name}.json"
    work = tmp_path / "work"
    work.mkdir()
    metrics = _run_stage("prompts", work, params)
    assert metrics["coco_prompts"] == metrics["ade20k_prompts"] == 1000
    assert metrics["coco_categories"] == 80 and metrics["ade20k_categories"] == 100
    for name in multigen_files.MULTIGEN_SETS:
        assert (work / "artifacts/data/multigen" / f"{name}.json").read_bytes() == official(shared_data, name).read_bytes()


def test_edit_data_stage_paper_copies_given_root(tmp_path):
    root = tmp_path / "PIE-Bench"
    write_demo_piebench(root, 2, seed=3, size=512)
    params = _params("paper")
    params["profiles"]["paper"]["edit_data"]["root"] = str(root)
    work = tmp_path / "work"
    work.mkdir()
    metrics = _run_stage("edit_data", work, params)
    assert metrics["source"] == "piebench" and metrics["entries"] == 2
    assert (work / "artifacts/data/piebench/mapping_file.json").read_bytes() == (root / "mapping_file.json").read_bytes()
    assert metrics["bad_input"] == 0
    params["profiles"]["paper"]["edit_data"]["root"] = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="forms.gle"):
        _run_stage("edit_data", work, params)


def test_edit_data_stage_counts_hostile_entries(tmp_path, caplog):
    root, good, reasons = _hostile_piebench(tmp_path)
    params = _params("paper")
    params["profiles"]["paper"]["edit_data"]["root"] = str(root)
    work = tmp_path / "work"
    work.mkdir()
    before = _snapshot(tmp_path, work)
    with caplog.at_level("WARNING", logger="stages.edit_data"):
        metrics = _run_stage("edit_data", work, params)
    assert metrics["entries"] == len(good) == 4
    assert metrics["bad_input"] == 4
    for reason in ("parent_escape", "absolute_path", "symlink_escape", "mask_out_of_frame"):
        assert metrics[f"bad_input_{reason}"] == 1
    assert metrics["bad_input_empty_name"] == 0
    summary = [r.getMessage() for r in caplog.records if r.name == "stages.edit_data" and r.levelname == "WARNING"]
    assert len(summary) == 1 and "4 entries" in summary[0]
    assert all(image_id in summary[0] for image_id in reasons)
    assert _snapshot(tmp_path, work) == before
