"""MultiGen scoring (SPEC §3.4-3.5), OWLv2 detection on the tiny detector, and the three stages end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.datasets.multigen_files import load_prompt_set
from pipeline.multigen.detection import (STATUS_DETECT_FAILED, STATUS_NO_IMAGE, detect_batch, detect_prompt_set,
                                         detect_rows, label_max_scores, load_detector, queries_for)
from pipeline.multigen.found import objects_found
from pipeline.multigen.scoring import category_counts, format_row, mg_scores, score_records
from pipeline.multigen.settings import MultiGenScale
from pipeline.store.codecs import png_bytes
from pipeline.store.shards import STATUS_OK, read_shards, write_table

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "a photo of a {name}"
WORKED = {  # SPEC §3.5: prompt id -> objects; (prompt, image) -> kept class names (score > 0.1)
    0: ["book", "cup", "kite", "mouse", "surfboard"],
    1: ["wine glass", "skateboard", "refrigerator", "boat", "vase"],
}
KEPT = {(0, 0): ["book", "cup", "cup", "kite"], (0, 1): ["book"], (1, 0): WORKED[1], (1, 1): []}


def record(prompt_id, image_index, objects, scores, labels, status=STATUS_OK):
    """A detection row as the detect stage writes it (only the fields scoring reads)."""
    return {"prompt_id": prompt_id, "image_index": image_index, "objects": objects, "status": status,
            "label_max_scores": label_max_scores(scores, labels, len(objects)) if status == STATUS_OK else []}


def worked_records():
    """The worked example as box lists: kept boxes score 0.5, plus boxes at or below 0.1 that must not count."""
    rows = []
    for (p, j), kept in KEPT.items():
        objects = WORKED[p]
        labels = [objects.index(n) for n in kept] + [4, 4, 3]
        scores = [0.5] * len(kept) + [0.1, 0.05, 0.1]  # at the threshold: not kept (strict >)
        rows.append(record(p, j, objects, scores, labels))
    return rows


def test_worked_example_of_spec():
    scores = score_records(worked_records(), threshold=0.1, num_prompts=2, images_per_prompt=2)
    assert [scores[f"mg{k}"] for k in range(1, 6)] == [75.0, 50.0, 50.0, 25.0, 25.0]
    assert [scores[f"mg{k}_std"] for k in range(1, 6)] == [25.0, 50.0, 50.0, 25.0, 25.0]
    assert format_row(scores) == "75.00(25.00) 50.00(50.00) 50.00(50.00) 25.00(25.00) 25.00(25.00)"
    assert (scores["images_scored"], scores["images_failed"], scores["images_missing"]) == (4, 0, 0)


def independent_mg(boxes, threshold, num_prompts, num_images):
    """Straight from SPEC §3.4: kept class names per image, count_k, per-index SR, np.std(axis=0)."""
    n = {}
    for (p, j), (objects, scores, labels) in boxes.items():
        kept = {objects[l] for s, l in zip(scores, labels) if s > threshold}
        n[(p, j)] = len(kept & set(objects))
    mg = [100.0 * sum(v >= k for v in n.values()) / len(n) for k in range(1, 6)]
    sr = np.array([[100.0 * sum(n[(p, j)] >= k for p in range(num_prompts)) / num_prompts for k in range(1, 6)]
                   for j in range(num_images)])
    return mg, list(np.std(sr, axis=0))


@pytest.mark.parametrize("threshold", [0.1, 0.05, 0.3])
def test_scorer_matches_an_independent_computation(threshold):
    rng = np.random.default_rng(123)
    num_prompts, num_images = 13, 10
    boxes = {}
    for p in range(num_prompts):
        objects = [f"obj{p}_{q}" for q in range(5)]
        for j in range(num_images):
            nb = int(rng.integers(0, 40))
            boxes[(p, j)] = (objects, rng.beta(0.5, 3.0, nb).tolist(), rng.integers(0, 5, nb).tolist())
    rows = [record(p, j, *b) for (p, j), b in boxes.items()]
    got = score_records(rows, threshold, num_prompts, num_images)
    mg, std = independent_mg(boxes, threshold, num_prompts, num_images)
    np.testing.assert_allclose([got[f"mg{k}"] for k in range(1, 6)], mg, rtol=0, atol=1e-9)
    np.testing.assert_allclose([got[f"mg{k}_std"] for k in range(1, 6)], std, rtol=0, atol=1e-9)
    assert 0 < got["mg1"] and got["mg5"] < 100


def test_category_counts_match_an_independent_computation():
    """Per category: scored images whose prompt names it and those with a box of it above the threshold, from
    raw boxes; a name twice in a prompt counts once; failed rows are left out; the found counts add up to the
    per-image counts MG_k uses."""
    rng = np.random.default_rng(7)
    names = ["cat", "dog", "cup", "kite", "boat", "vase", "book"]
    rows, expected_images, expected_found = [], {}, {}
    for p in range(30):
        objects = list(rng.choice(names, 5, replace=True))
        nb = int(rng.integers(0, 12))
        scores, labels = rng.beta(0.6, 2.0, nb).tolist(), rng.integers(0, 5, nb).tolist()
        failed = p % 7 == 3
        rows.append(record(p, 0, objects, scores, labels, status=STATUS_NO_IMAGE if failed else STATUS_OK))
        if failed:
            continue
        for name in set(objects):
            expected_images[name] = expected_images.get(name, 0) + 1
            hit = any(s > 0.2 and objects[lab] == name for s, lab in zip(scores, labels))
            expected_found[name] = expected_found.get(name, 0) + hit
    table = category_counts(rows, 0.2).set_index("category")
    assert dict(table["images"]) == expected_images and dict(table["found"]) == expected_found
    np.testing.assert_allclose(table["rate"], 100 * table["found"] / table["images"])
    per_image = sum(objects_found(r["objects"], r["label_max_scores"], 0.2) for r in rows if r["status"] == STATUS_OK)
    assert table["found"].sum() == per_image
    empty = category_counts([], 0.1)
    assert list(empty.columns) == ["category", "images", "found", "rate"] and empty["images"].dtype == np.int64
    with pytest.raises(ValueError, match="3 objects but 2 query scores"):
        category_counts([{"objects": ["a", "b", "c"], "label_max_scores": [0.5, 0.5], "status": STATUS_OK}], 0.1)


def test_failed_and_missing_images_are_counted_not_scored():
    rows = worked_records()
    rows[1] = record(0, 1, WORKED[0], [], [], status=STATUS_NO_IMAGE)
    del rows[3]                                                   # image 1_1 missing
    scores = score_records(rows, 0.1, num_prompts=2, images_per_prompt=2)
    assert (scores["images_scored"], scores["images_failed"], scores["images_missing"]) == (2, 1, 1)
    # valid images 0_0 (n=3) and 1_0 (n=5): both reach k<=3, one reaches 4 and 5
    assert [scores[f"mg{k}"] for k in range(1, 6)] == [100.0, 100.0, 100.0, 50.0, 50.0]
    with pytest.raises(ValueError, match="outside the expected"):
        score_records(worked_records(), 0.1, num_prompts=1, images_per_prompt=2)


def test_mg_scores_std_is_population_std():
    found = np.array([[5, 0], [0, 0]])       # index 0: 50 % for every k, index 1: 0 %
    scores = mg_scores(found)
    assert scores["mg1"] == 25.0 and scores["mg1_std"] == 25.0   # np.std([50, 0]), ddof=0 (ddof=1: 35.36)


def test_label_max_scores_and_objects_found():
    assert label_max_scores([0.2, 0.7, 0.4], [1, 1, 3], 5) == [0.0, 0.7, 0.0, 0.4, 0.0]
    assert objects_found(["a", "b", "c"], [0.1, 0.11, 0.5], 0.1) == 2
    with pytest.raises(ValueError, match="box labels"):
        label_max_scores([0.5], [5], 5)


def test_official_prompt_files_load(shared_data):
    coco = load_prompt_set(shared_data / "multigen" / "coco_obj_comp_5_1k.json")
    assert len(coco) == 1000 and coco[0].objects == ("book", "cup", "kite", "mouse", "surfboard")
    assert coco[1].objects[0] == "wine glass"
    assert queries_for(coco[0].objects, TEMPLATE)[0] == "a photo of a book"


def test_queries_keep_prompt_order():
    """Label index k means the prompt's k-th object, so the queries must not be reordered."""
    assert queries_for(["vase", "book", "cup"], TEMPLATE) == ["a photo of a vase", "a photo of a book",
                                                             "a photo of a cup"]


# --- detection on the tiny OWLv2 ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detector(embedded):
    path = embedded("tiny-owlv2")
    return load_detector("embedded:tiny-owlv2", path.parent, "cpu")


def random_images(n, seed=0, size=(128, 96)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]


def test_detection_keeps_every_box_and_matches_the_model_called_directly(detector):
    import torch
    from PIL import Image

    images = [Image.fromarray(a) for a in random_images(3)]
    queries = [queries_for(WORKED[0], TEMPLATE), queries_for(WORKED[1], TEMPLATE), queries_for(WORKED[0], TEMPLATE)]
    rows = detect_batch(detector, images, queries)
    num_boxes = (96 // 16) ** 2
    for img, q, row in zip(images, queries, rows):
        inputs = detector.processor(text=[q], images=[img], return_tensors="pt")
        with torch.no_grad():
            logits = detector.model(**inputs).logits[0]          # (boxes, queries)
        logits = logits.double().numpy()
        label = logits.argmax(axis=1)
        probs = 1.0 / (1.0 + np.exp(-logits))
        assert len(row["box_scores"]) == num_boxes
        np.testing.assert_allclose(row["box_scores"], probs.max(axis=1), atol=1e-5)
        assert row["box_labels"] == label.tolist()
        best = [probs[label == k, k].max(initial=0.0) for k in range(5)]
        np.testing.assert_allclose(row["label_max_scores"], best, atol=1e-5)


CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.mark.parametrize("side", [128, 64])          # the detector's 96 px input: down- and up-sampling
def test_detector_input_is_the_original_resize(embedded, side):
    """``image_backend: pil`` (the default) gives OWLv2 the skimage resize of the original processor
    (bilinear, reflect, Gaussian anti-aliasing) and OWL-ViT PIL's bicubic resize, each then normalised with
    CLIP's mean and std; the threaded per-image path equals one batched processor call."""
    import torch
    from PIL import Image
    from skimage.transform import resize

    from pipeline.multigen.detection import pixel_values

    arrays = random_images(3, seed=side, size=(side, side))
    images = [Image.fromarray(a) for a in arrays]
    for name in ("tiny-owlv2", "tiny-owlvit"):
        det = load_detector(f"embedded:{name}", embedded(name).parent, "cpu")
        got = pixel_values(det.processor.image_processor, images)
        assert torch.equal(got, det.processor(text=[["a cat"]] * 3, images=images, return_tensors="pt")["pixel_values"])
        for a, g in zip(arrays, got.permute(0, 2, 3, 1).double().numpy()):
            if name == "tiny-owlv2":
                ref = resize(a / 255.0, (96, 96), order=1, mode="reflect", anti_aliasing=True)
            else:
                ref = np.asarray(Image.fromarray(a).resize((96, 96), Image.BICUBIC)) / 255.0
            np.testing.assert_allclose(g, (ref - CLIP_MEAN) / CLIP_STD, atol=1e-5)


def test_scores_are_compared_with_the_threshold_in_float32():
    """The detectors compare float32 scores with 0.1 in float32: float32(0.1) itself is not above 0.1."""
    from pipeline.visor import image_outcome

    at = float(np.float32(0.1))
    assert at > 0.1 and objects_found(["a", "b"], [at, 0.2], 0.1) == 1
    assert image_outcome("above", [at, 0.5], [0, 1], [[0, 0], [0, 1]], 0.1) == (False, True, False)


def test_detect_rows_keep_failed_samples(detector, monkeypatch):
    samples = [{"prompt_id": 0, "image_index": j, "objects": WORKED[0], "status": STATUS_OK, "error": "",
                "image": png_bytes(a)} for j, a in enumerate(random_images(2))]
    samples.append({"prompt_id": 0, "image_index": 2, "objects": WORKED[0], "status": "nan_image",
                    "error": "decoded image has NaN", "image": None})
    rows = detect_rows(detector, samples, TEMPLATE, batch_size=2)
    assert [r["status"] for r in rows] == [STATUS_OK, STATUS_OK, STATUS_NO_IMAGE]
    assert "nan_image" in rows[2]["error"] and rows[0]["queries"][1] == "a photo of a cup"
    monkeypatch.setattr("pipeline.multigen.detection.detect_batch", lambda *a: (_ for _ in ()).throw(RuntimeError("oom")))
    failed = detect_rows(detector, samples[:2], TEMPLATE, batch_size=2)
    assert [r["status"] for r in failed] == [STATUS_DETECT_FAILED] * 2 and "oom" in failed[0]["error"]


def test_one_bad_image_fails_only_itself(detector, monkeypatch):
    """A corrupt PNG and an image whose detection raises even alone cost only their own rows: the batch is
    retried image by image, and the other images get the same detections as an undisturbed run."""
    from pipeline.multigen import detection as multigen

    samples = [{"prompt_id": 0, "image_index": j, "objects": WORKED[0], "status": STATUS_OK, "error": "",
                "image": png_bytes(a)} for j, a in enumerate(random_images(4))]
    clean = detect_rows(detector, samples, TEMPLATE, batch_size=4)
    samples[1] = dict(samples[1], image=b"\x89PNG truncated")
    poison = samples[2]["image"]
    real = multigen.detect_batch

    def failing(det, images, queries):
        if any(png_bytes(im) == poison for im in images):
            raise RuntimeError("CUDA out of memory")
        return real(det, images, queries)

    monkeypatch.setattr(multigen, "detect_batch", failing)
    rows = detect_rows(detector, samples, TEMPLATE, batch_size=4)
    assert [r["status"] for r in rows] == [STATUS_OK, multigen.STATUS_CORRUPT_IMAGE, STATUS_DETECT_FAILED, STATUS_OK]
    assert "out of memory" in rows[2]["error"] and "decode" in rows[1]["error"]
    for j in (0, 3):
        np.testing.assert_allclose(rows[j]["label_max_scores"], clean[j]["label_max_scores"], atol=1e-5)


def test_detections_follow_new_samples(detector, tmp_path):
    """Each detection shard records its sample shards' contents: new images invalidate their detections."""
    sample_dir, out = tmp_path / "samples", tmp_path / "det"
    sample_dir.mkdir()
    rows = [{"prompt_id": 0, "image_index": j, "objects": WORKED[0], "status": STATUS_OK, "error": "",
             "image": png_bytes(a)} for j, a in enumerate(random_images(2))]
    write_table(rows, sample_dir / "part-00000.parquet")
    scale = MultiGenScale(detector="embedded:tiny-owlv2", batch_size=2)
    detect_prompt_set(detector, sample_dir, out, TEMPLATE, scale, {"w": 1})
    before = read_shards(out)
    rows[0]["image"] = png_bytes(random_images(1, seed=9)[0])
    write_table(rows, sample_dir / "part-00000.parquet")
    detect_prompt_set(detector, sample_dir, out, TEMPLATE, scale, {"w": 1})
    after = read_shards(out)
    assert before.loc[1, "box_scores"].tolist() == after.loc[1, "box_scores"].tolist()
    assert before.loc[0, "box_scores"].tolist() != after.loc[0, "box_scores"].tolist()


def test_only_new_sample_shards_are_detected(detector, tmp_path, monkeypatch):
    """A second sample shard (more prompts): the first detection shard is kept, the second computed."""
    from pipeline.multigen import detection as multigen

    sample_dir, out = tmp_path / "samples", tmp_path / "det"
    sample_dir.mkdir()
    for shard, seed in ((0, 1), (1, 2)):
        rows = [{"prompt_id": shard, "image_index": j, "objects": WORKED[0], "status": STATUS_OK, "error": "",
                 "image": png_bytes(a)} for j, a in enumerate(random_images(2, seed=seed))]
        write_table(rows, sample_dir / f"part-{shard:05d}.parquet")
        if shard == 0:
            scale = MultiGenScale(detector="embedded:tiny-owlv2", batch_size=2)
            detect_prompt_set(detector, sample_dir, out, TEMPLATE, scale, {"w": 1})
            first = (out / "part-00000.parquet").read_bytes()
    detected = []
    real = multigen.detect_rows
    monkeypatch.setattr(multigen, "detect_rows", lambda d, rows, *a, **k: detected.append(
        rows[0]["prompt_id"]) or real(d, rows, *a, **k))
    detect_prompt_set(detector, sample_dir, out, TEMPLATE, scale, {"w": 1})
    assert detected == [1] and (out / "part-00000.parquet").read_bytes() == first
    assert read_shards(out)["prompt_id"].tolist() == [0, 0, 1, 1]


# --- the three stages end to end ------------------------------------------------------------------------

def test_stages_sample_detect_score_end_to_end(embedded, shared_data, tmp_path, monkeypatch):
    for name in ("tiny-sd", "tiny-owlv2", "tiny-owlvit", "tiny-sd-unet-a"):
        embedded(name)
    (tmp_path / "artifacts" / "data" / "multigen").mkdir(parents=True)
    os.symlink(embedded("tiny-sd").parent, tmp_path / "artifacts" / "models")
    for name, official in (("coco", "coco_obj_comp_5_1k.json"), ("ade20k", "ade20k_obj_comp_5_1k.json")):
        entries = json.loads((shared_data / "multigen" / official).read_text())[:3]
        (tmp_path / "artifacts" / "data" / "multigen" / f"{name}.json").write_text(json.dumps(entries))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sample_grid"]["models"] = ["tokencompose_a"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    from stages import detect, sample, sample_grid, score, visor

    for stage in (sample, detect, score, visor):
        stage.main("tokencompose_a")
    sample_grid.main()
    demo = yaml.safe_load(Path("params.yaml").read_text())["profiles"]["demo"]["sampling"]
    prompts, images = min(3, demo["max_prompts"] or 3), demo["images_per_prompt"]
    metrics = json.loads(Path("metrics/multigen/tokencompose_a.json").read_text())
    for prefix in ("coco", "ade20k"):
        assert {f"{prefix}_mg{k}" for k in range(1, 6)} | {f"{prefix}_mg{k}_std" for k in range(1, 6)} <= set(metrics)
        assert metrics[f"{prefix}_images_scored"] == prompts * images and metrics[f"{prefix}_images_missing"] == 0
        assert all(0 <= metrics[f"{prefix}_mg{k}"] <= 100 for k in range(1, 6))
    assert metrics["unet"] == "embedded:tiny-sd-unet-a" and "stand-in" in metrics["note"]
    assert metrics["threshold"] == 0.1 and metrics["images_per_prompt"] == images
    samples = read_shards(Path("artifacts/samples/tokencompose_a/coco"))
    keys = sorted(zip(samples.prompt_id, samples.image_index))
    assert keys == [(p, j) for p in range(prompts) for j in range(images)]
    detections = read_shards(Path("artifacts/detections/tokencompose_a/ade20k"))
    assert (detections.status == STATUS_OK).all() and len(detections.box_scores[0]) == (96 // 16) ** 2
    table = pd.read_csv("plots/multigen_categories/tokencompose_a.csv")
    assert list(table.columns) == ["prompt_set", "category", "images", "found", "rate"]
    assert set(table.prompt_set) == {"coco", "ade20k"} and (table.images <= prompts * images).all()
    grid = json.loads(Path("metrics/sample_grid.json").read_text())
    assert grid["models"] == "tokencompose_a" and grid["coco_prompts"] == prompts
    assert [grid[f"{s}_cells_without_image"] for s in ("coco", "ade20k", "sr2d")] == [0, 0, 0]
    visor_prompts = params["profiles"]["demo"]["visor"]["max_prompts"]
    assert grid["sr2d_prompts"] == min(params["sample_grid"]["num_prompts"], visor_prompts)
    assert {p.name for p in Path("plots/samples").iterdir()} == {"coco.png", "ade20k.png", "sr2d.png"}
    params["sample_grid"]["image_index"] = images
    Path("params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match=f"sample_grid.image_index: {images} is not a MultiGen image"):
        sample_grid.main()
    params["profiles"]["demo"]["sampling"]["images_per_prompt"] = params["visor"]["images_per_prompt"] + 1
    params["sample_grid"]["image_index"] = params["visor"]["images_per_prompt"]  # a MultiGen image, not a VISOR one
    Path("params.yaml").write_text(yaml.safe_dump(params))
    sample_grid.main()  # the MultiGen grids (images missing: not sampled with these params) and no SR2D grid
    grid = json.loads(Path("metrics/sample_grid.json").read_text())
    assert f"VISOR samples {params['visor']['images_per_prompt']} images per prompt" in grid["sr2d_skipped"]
    assert "sr2d_prompts" not in grid
    assert {p.name for p in Path("plots/samples").iterdir()} == {"coco.png", "ade20k.png"}
    assert grid["coco_cells_without_image"] == prompts  # recorded, not dropped


def test_mg_std_uses_valid_images_per_index_and_skips_empty_indices():
    """Per-index rates divide by that index's valid images (not by P); an index without one is skipped."""
    found = np.array([[5, 0], [0, 5]])
    scores = mg_scores(found, np.array([[True, True], [False, True]]))
    assert scores["mg1"] == pytest.approx(200 / 3)
    assert scores["mg1_std"] == pytest.approx(25.0)  # np.std([100 (1 of 1), 50 (1 of 2)])
    assert mg_scores(found, np.array([[True, False], [True, False]]))["mg1_std"] == 0.0
