"""VISOR on SR2D (SPEC §3.6): the prompt set, the any-pair relation rule, the scores, and the stage."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ConfigError, load_params, section
from pipeline.datasets.categories import load_categories
from pipeline.multigen.detection import detect_rows, load_detector
from pipeline.store.shards import STATUS_OK, read_shards
from pipeline.visor import (RELATIONS, SPATIAL_SIZE, SR2D_SIZE, VisorCfg, VisorScale, image_outcome, relation_holds,
                            spatial_prompts, sr2d_entries, with_article)
from pipeline.visor_scoring import visor_scores

REPO = Path(__file__).resolve().parents[1]
NAMES = load_categories("coco")


# --- the prompt set ---------------------------------------------------------------------------------------

def test_sr2d_has_visors_size_order_and_ids():
    entries = sr2d_entries(NAMES)
    assert len(entries) == SR2D_SIZE == 31_680
    assert [e["unique_id"] for e in entries] == list(range(SR2D_SIZE))
    kinds = [e["rel_type"] for e in entries]
    assert kinds.count("and") == 2 * math.comb(80, 2) and kinds.count("single") == 80
    assert sum(k in RELATIONS for k in kinds) == SPATIAL_SIZE == 8 * math.comb(80, 2)
    assert entries[0]["text"] == "a person to the left of a bicycle"
    assert entries[1]["text"] == "a bicycle to the left of a person"
    assert entries[2]["text"] == "a person to the right of a bicycle"
    assert entries[8]["text"] == "a person and a bicycle" and entries[9]["text"] == "a bicycle and a person"
    assert entries[-1] == {"unique_id": 31_679, "num_objects": 1, "obj_1_attributes": ["toothbrush"],
                           "obj_2_attributes": [None], "rel_type": "single", "text": "a toothbrush"}


def test_every_spatial_prompt_sits_where_the_pair_and_relation_put_it():
    """Entry 10 c + 2 r (+1 swapped) for pair c (itertools order) and relation r, checked on every pair."""
    entries = sr2d_entries(NAMES)
    for c, (a, b) in enumerate(itertools.combinations(NAMES, 2)):
        for r, rel in enumerate(RELATIONS):
            first, second = entries[10 * c + 2 * r], entries[10 * c + 2 * r + 1]
            assert (first["obj_1_attributes"][0], first["obj_2_attributes"][0], first["rel_type"]) == (a, b, rel)
            assert (second["obj_1_attributes"][0], second["obj_2_attributes"][0]) == (b, a)
            assert first["text"] == f"{with_article(a)} {rel} {with_article(b)}"


def test_articles_of_the_coco_names():
    an = sorted(n for n in NAMES if with_article(n).startswith("an "))
    assert an == ["airplane", "apple", "elephant", "orange", "oven", "umbrella"]
    assert with_article("hair drier") == "a hair drier" and with_article("tv") == "a tv"


def test_subsets_are_seeded_nested_and_spread_over_pairs():
    full = spatial_prompts(NAMES)
    assert len(full) == SPATIAL_SIZE and all(p.relation in RELATIONS and len(p.objects) == 2 for p in full)
    assert sorted(p.prompt_id for p in full) == sorted({p.prompt_id for p in full})  # every prompt, once
    subset = spatial_prompts(NAMES, 500, seed=0)
    ids = [p.prompt_id for p in subset]
    assert len(set(ids)) == 500 and ids != sorted(ids)   # a random order, not the file's
    assert ids == [p.prompt_id for p in spatial_prompts(NAMES, 500, seed=0)]
    assert ids != [p.prompt_id for p in spatial_prompts(NAMES, 500, seed=1)]
    # nested: a larger subset, and the whole set, begin with the smaller one (finished shards are kept)
    assert [p.prompt_id for p in spatial_prompts(NAMES, 800, seed=0)][:500] == ids == [p.prompt_id for p in full[:500]]
    by_id = {p.prompt_id: p for p in spatial_prompts(NAMES, max_prompts=None, seed=1)}
    assert all(by_id[p.prompt_id] == p for p in subset)
    assert len({o for p in subset for o in p.objects}) > 70   # the file's first 500 would hold 8 names
    assert spatial_prompts(NAMES, SPATIAL_SIZE + 1) == full


# --- relations and scores -------------------------------------------------------------------------------

def pairwise_relation(relation, centers_a, centers_b):
    """VISOR's loop: some (A, B) pair with x_A - x_B (or y) of the relation's sign."""
    for (xa, ya), (xb, yb) in itertools.product(centers_a, centers_b):
        dx, dy = xa - xb, ya - yb
        if ((relation == "to the left of" and dx < 0) or (relation == "to the right of" and dx > 0)
                or (relation == "above" and dy < 0) or (relation == "below" and dy > 0)):
            return True
    return False


def test_relation_shortcut_equals_the_pairwise_rule():
    rng = np.random.default_rng(0)
    for _ in range(400):
        a = rng.integers(0, 4, (rng.integers(0, 4), 2)) / 4     # coarse grid: ties happen
        b = rng.integers(0, 4, (rng.integers(0, 4), 2)) / 4
        for rel in RELATIONS:
            assert relation_holds(rel, a, b) == pairwise_relation(rel, a, b), (rel, a, b)
    with pytest.raises(ValueError, match="unknown relation"):
        relation_holds("near", np.zeros((1, 2)), np.zeros((1, 2)))


def test_worked_example():
    """Two prompts x 2 images, boxes placed by hand; threshold 0.1 (strict)."""
    prompts = sorted((p for p in spatial_prompts(NAMES) if p.prompt_id in (0, 4)),   # left of; above
                     key=lambda p: p.prompt_id)
    assert [p.relation for p in prompts] == ["to the left of", "above"]
    rows = [
        # prompt 0 image 0: person at x .2, bicycle at x .7 -> both, left of holds
        {"prompt_id": 0, "image_index": 0, "status": STATUS_OK, "box_scores": [0.5, 0.3, 0.05],
         "box_labels": [0, 1, 1], "box_centers": [[0.2, 0.5], [0.7, 0.5], [0.1, 0.5]]},
        # prompt 0 image 1: bicycle only scores exactly 0.1 (not > 0.1) -> A only
        {"prompt_id": 0, "image_index": 1, "status": STATUS_OK, "box_scores": [0.9, 0.1],
         "box_labels": [0, 1], "box_centers": [[0.2, 0.5], [0.7, 0.5]]},
        # prompt 4 image 0: both, person below the bicycle (y grows downwards) -> "above" fails
        {"prompt_id": 4, "image_index": 0, "status": STATUS_OK, "box_scores": [0.4, 0.4],
         "box_labels": [0, 1], "box_centers": [[0.5, 0.8], [0.5, 0.2]]},
        # prompt 4 image 1: sampling failed
        {"prompt_id": 4, "image_index": 1, "status": "no_image", "box_scores": [], "box_labels": [],
         "box_centers": []},
    ]
    s = visor_scores(rows, prompts, 0.1, 2)
    assert s["oa"] == pytest.approx(200 / 3) and s["oa_a"] == 100 and s["oa_b"] == pytest.approx(200 / 3)
    assert s["visor_cond"] == 50 and s["visor_uncond"] == pytest.approx(100 / 3)
    assert s["visor_1"] == 50 and s["visor_2"] == 0
    assert (s["images_expected"], s["images_scored"], s["images_failed"], s["images_missing"]) == (4, 3, 1, 0)


def reference_scores(rows, relation, threshold, images_per_prompt):
    """An independent implementation following VISOR's visor.py line by line (failed rows skipped)."""
    both_n = a_n = b_n = right_n = count = 0
    per_prompt = {}
    for r in rows:
        if r["status"] != STATUS_OK:
            continue
        kept = [(lab, c) for s, lab, c in zip(r["box_scores"], r["box_labels"], r["box_centers"]) if s > threshold]
        ca = [c for lab, c in kept if lab == 0]
        cb = [c for lab, c in kept if lab == 1]
        both = int(bool(ca) and bool(cb))
        sra = int(both and pairwise_relation(relation[r["prompt_id"]], ca, cb))
        both_n, a_n, b_n, right_n, count = both_n + both, a_n + bool(ca), b_n + bool(cb), right_n + sra, count + 1
        per_prompt.setdefault(r["prompt_id"], []).append(sra)
    cond = 100 * right_n / both_n if both_n else float("nan")
    out = {"oa": 100 * both_n / count, "oa_a": 100 * a_n / count, "oa_b": 100 * b_n / count,
           "visor_cond": cond, "visor_uncond": cond * (100 * both_n / count) / 100 if both_n else 0.0}
    for k in range(1, images_per_prompt + 1):
        out[f"visor_{k}"] = 100 * sum(sum(v) >= k for v in per_prompt.values()) / len(per_prompt)
    return out


def test_scores_equal_an_independent_computation_on_random_detections():
    rng = np.random.default_rng(3)
    prompts = spatial_prompts(NAMES, 40, seed=5)
    relation = {p.prompt_id: p.relation for p in prompts}
    rows = []
    for p in prompts:
        for j in range(4):
            n = int(rng.integers(0, 6))
            rows.append({"prompt_id": p.prompt_id, "image_index": j,
                         "status": STATUS_OK if rng.random() > 0.1 else "detect_failed",
                         "box_scores": rng.random(n).tolist(), "box_labels": rng.integers(0, 2, n).tolist(),
                         "box_centers": rng.random((n, 2)).tolist()})
    rows = rows[:-3]                                           # three images missing
    got = visor_scores(rows, prompts, 0.4, 4)
    want = reference_scores(rows, relation, 0.4, 4)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got["images_missing"] == 3 and got["images_scored"] + got["images_failed"] == len(rows)


def test_rows_outside_the_expected_prompts_are_an_error():
    prompts = spatial_prompts(NAMES, 3, seed=0)
    row = {"prompt_id": -1, "image_index": 0, "status": STATUS_OK, "box_scores": [], "box_labels": [],
           "box_centers": []}
    with pytest.raises(ValueError, match="not among the expected prompts"):
        visor_scores([row], prompts, 0.1, 4)
    with pytest.raises(ValueError, match="differ"):
        image_outcome("above", [0.5], [0, 1], [[0, 0]], 0.1)


def test_no_image_with_both_objects_gives_nan_cond_not_a_crash():
    prompts = spatial_prompts(NAMES, 1, seed=0)
    row = {"prompt_id": prompts[0].prompt_id, "image_index": 0, "status": STATUS_OK, "box_scores": [0.9],
           "box_labels": [0], "box_centers": [[0.5, 0.5]]}
    s = visor_scores([row], prompts, 0.1, 1)
    assert s["oa"] == 0 and s["oa_a"] == 100 and math.isnan(s["visor_cond"]) and s["visor_uncond"] == 0


# --- params ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_params_sections_parse(profile):
    params = load_params(REPO / "params.yaml")
    params["profile"] = profile
    assert section(params, "visor", VisorCfg).images_per_prompt == 4
    scale = section(params, "profile.visor", VisorScale)
    assert scale.detection.detector.endswith("owlvit" if profile == "demo" else "owlvit-base-patch32")


def test_stage_checks_the_detector_before_sampling(tmp_path, monkeypatch):
    from pipeline.models import ModelLoadError

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["demo"]["visor"]["detection"]["detector"] = "embedded:no-such-detector"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(REPO / "data" / "categories", tmp_path / "data" / "categories")
    monkeypatch.chdir(tmp_path)
    from stages import visor

    monkeypatch.setattr(visor, "open_sampler", lambda *a: pytest.fail("sampled before the detector was loaded"))
    with pytest.raises((ModelLoadError, FileNotFoundError, ValueError)):
        visor.main("sd14")


def test_stage_tracks_every_sampler_setting_it_uses():
    """dvc.yaml lists each sampling field the stage reads, and not the two that visor.* replaces."""
    from dataclasses import fields

    from pipeline.sampling.settings import SamplingScale

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["visor"]["do"]
    listed = {p.split(".", 3)[3] for p in stage["params"] if p.startswith("profiles.${profile}.sampling.")}
    assert listed == {f.name for f in fields(SamplingScale)} - {"images_per_prompt", "max_prompts"}
    assert {"sampling", "visor", "profiles.${profile}.visor"} <= set(stage["params"])


@pytest.mark.parametrize("key, value, message", [
    ("query_template", "a photo", r"must hold the object name"),
    ("threshold", 1.0, r"out of range"),
    ("images_per_prompt", 0, r"out of range"),
])
def test_bad_visor_params_are_config_errors(key, value, message):
    params = load_params(REPO / "params.yaml")
    params["visor"][key] = value
    with pytest.raises(ConfigError, match=message):
        section(params, "visor", VisorCfg)


# --- detection and the stage ---------------------------------------------------------------------------------

def test_owlvit_detections_keep_box_centres(embedded):
    import torch
    from PIL import Image

    detector = load_detector("embedded:tiny-owlvit", embedded("tiny-owlvit").parent, "cpu")
    assert type(detector.model).__name__ == "OwlViTForObjectDetection"
    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    buf = __import__("io").BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    sample = {"prompt_id": 0, "image_index": 0, "objects": ["cat", "dog"], "status": STATUS_OK, "error": "",
              "image": buf.getvalue()}
    row = detect_rows(detector, [sample], "a photo of a {name}", 1, keep_centers=True)[0]
    inputs = detector.processor(text=[["a photo of a cat", "a photo of a dog"]], images=[Image.fromarray(image)],
                                return_tensors="pt")
    with torch.no_grad():
        boxes = detector.model(**inputs).pred_boxes[0]         # (N, 4) centre x, centre y, w, h
    np.testing.assert_allclose(row["box_centers"], boxes[:, :2].clamp(0, 1).numpy(), atol=1e-5)
    assert "box_centers" not in detect_rows(detector, [sample], "a photo of a {name}", 1)[0]


def shard_stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.parquet"))}


def test_stage_samples_detects_and_scores(embedded, tmp_path, monkeypatch):
    for name in ("tiny-sd", "tiny-owlvit"):
        embedded(name)
    (tmp_path / "artifacts").mkdir()
    os.symlink(embedded("tiny-sd").parent, tmp_path / "artifacts" / "models")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["visor"].update(images_per_prompt=3, query_template="a picture of a {name}")  # not multigen's
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(REPO / "data" / "categories", tmp_path / "data" / "categories")
    monkeypatch.chdir(tmp_path)
    from stages import visor

    visor.main("sd14")
    prompts, images = params["profiles"]["demo"]["visor"]["max_prompts"], 3
    metrics = json.loads(Path("metrics/visor/sd14.json").read_text())
    assert metrics["prompts"] == prompts and metrics["prompts_total"] == SPATIAL_SIZE
    assert metrics["images_scored"] == prompts * images and metrics["images_failed"] == 0
    assert all(0 <= metrics[k] <= 100 for k in ("oa", "oa_a", "oa_b", "visor_uncond", "visor_1", "visor_3"))
    assert "visor_4" not in metrics and metrics["threshold"] == 0.1
    chosen = [p.prompt_id for p in spatial_prompts(NAMES, prompts, params["seed"])]
    samples = read_shards(Path("artifacts/visor/sd14/samples"))
    assert list(dict.fromkeys(samples.prompt_id)) == chosen   # the subset, in its seeded order
    assert set(samples.prompt) <= {p.text for p in spatial_prompts(NAMES)}
    detections = read_shards(Path("artifacts/visor/sd14/detections"))
    assert len(detections) == prompts * images and len(detections.box_centers[0]) == (96 // 16) ** 2
    assert detections.queries[0][0].startswith("a picture of a ")
    stamps = {d: shard_stamps(Path("artifacts/visor/sd14") / d) for d in ("samples", "detections")}

    visor.main("sd14")                                          # a rerun resumes: nothing recomputed
    assert json.loads(Path("metrics/visor/sd14.json").read_text()) == metrics
    params["visor"]["threshold"] = 0.6                          # rescoring only
    Path("params.yaml").write_text(yaml.safe_dump(params))
    visor.main("sd14")
    assert {d: shard_stamps(Path("artifacts/visor/sd14") / d) for d in stamps} == stamps
    rescored = json.loads(Path("metrics/visor/sd14.json").read_text())
    rows = read_shards(Path("artifacts/visor/sd14/detections")).to_dict("records")
    assert rescored["threshold"] == 0.6
    assert rescored["oa"] == visor_scores(rows, spatial_prompts(NAMES, prompts, params["seed"]), 0.6, 3)["oa"]


def test_stage_under_two_processes_equals_one_process(embedded, tmp_path):
    """torchrun with two CPU ranks: the ranks split the sample shards, meet, split the detection shards
    (each reading shards the other rank wrote), and the shards and metrics equal a one-process run's."""
    import subprocess
    import sys

    embedded("tiny-owlvit")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = {}
    for processes in (1, 2):
        root = tmp_path / f"p{processes}"
        (root / "artifacts").mkdir(parents=True)
        os.symlink(embedded("tiny-sd").parent, root / "artifacts" / "models")
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        shutil.copytree(REPO / "data" / "categories", root / "data" / "categories")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(REPO / "stages" / "visor.py"), "sd14"]
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = root
    assert "| 2/2" in done.stderr and "| 4/4" not in done.stderr, done.stderr[-2000:]  # 4 shards per phase, split
    for folder in ("samples", "detections"):
        one, two = (sorted((runs[n] / "artifacts/visor/sd14" / folder).glob("*.parquet")) for n in (1, 2))
        assert [f.name for f in one] == [f.name for f in two] and len(one) == 4
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two)), folder
    m1, m2 = (json.loads((runs[n] / "metrics/visor/sd14.json").read_text()) for n in (1, 2))
    assert m1 == m2 and m1["images_scored"] == 16


def test_visor_k_counts_only_prompts_with_a_scored_image():
    """VISOR_k's denominator is the prompts present in the results (visor.py): a prompt whose only image
    failed (e.g. A&E token indices) does not count as a prompt with no right image."""
    a, b = spatial_prompts(NAMES, 2, seed=0)
    centres = {"to the left of": [[.1, .5], [.9, .5]], "to the right of": [[.9, .5], [.1, .5]],
               "above": [[.5, .1], [.5, .9]], "below": [[.5, .9], [.5, .1]]}[a.relation]
    rows = [{"prompt_id": a.prompt_id, "image_index": 0, "status": STATUS_OK, "box_scores": [0.9, 0.9],
             "box_labels": [0, 1], "box_centers": centres},
            {"prompt_id": b.prompt_id, "image_index": 0, "status": "token_indices_failed", "box_scores": [],
             "box_labels": [], "box_centers": []}]
    assert visor_scores(rows, [a, b], 0.1, 1)["visor_1"] == 100.0


def test_defaults_are_the_benchmarks_own():
    from pipeline.multigen.settings import MultiGenCfg

    assert MultiGenCfg().threshold == VisorCfg().threshold == 0.1
    assert VisorCfg().images_per_prompt == 4 and VisorCfg().query_template == "a photo of a {name}"
