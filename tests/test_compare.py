"""Paired bootstrap intervals (pipeline.compare) against closed forms, the score stages' own values and
simulated coverage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.compare.bootstrap import bootstrap_p, holm, paired_interval, resample_weights
from pipeline.compare.pairs import (CompareCfg, clip_units, compare_clip, compare_multigen, compare_piebench,
                                    compare_units, compare_visor, multigen_units, piebench_units, visor_metrics,
                                    visor_units)
from pipeline.config import InputDataError
from pipeline.datasets.categories import load_categories
from pipeline.multigen.scoring import found_table, mg_scores
from pipeline.names import PIEBENCH_KEYS
from pipeline.piebench import summarize
from pipeline.store.shards import STATUS_OK
from pipeline.visor import spatial_prompts
from pipeline.visor_scoring import image_outcomes, visor_scores


def _paired_gaussians(n: int, delta: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit scores of two models that share a unit effect (so pairing matters): b = u, a = u + d."""
    rng = np.random.default_rng(seed)
    unit = rng.normal(0.0, 3.0, n)
    return unit + rng.normal(delta, 1.0, n), unit


def test_interval_of_a_mean_difference_matches_the_normal_closed_form():
    """For a mean of paired differences d_i the interval is mean(d) +- z * sd(d) / sqrt(n) (large n)."""
    a, b = _paired_gaussians(400, 0.3, seed=1)
    ones = np.ones_like(a)
    got = paired_interval(a, ones, b, ones, reps=8000, seed=0)
    d = a - b
    half = 1.959964 * d.std(ddof=0) / np.sqrt(d.size)
    assert got.diff == pytest.approx(d.mean(), abs=1e-12)
    assert got.low == pytest.approx(d.mean() - half, abs=0.08 * half)
    assert got.high == pytest.approx(d.mean() + half, abs=0.08 * half)
    assert got.units == 400 and got.significant == (got.low > 0)


def test_pairing_removes_the_shared_unit_effect():
    """The unpaired interval would be ~sqrt(9 + 9 + 1) / 1 wider; the paired one has the width of sd(d) only."""
    a, b = _paired_gaussians(300, 0.0, seed=2)
    ones = np.ones_like(a)
    got = paired_interval(a, ones, b, ones, reps=4000, seed=0)
    paired_half = 1.96 * (a - b).std() / np.sqrt(a.size)
    unpaired_half = 1.96 * np.sqrt(a.var() + b.var()) / np.sqrt(a.size)
    assert (got.high - got.low) / 2 == pytest.approx(paired_half, rel=0.1)
    assert unpaired_half > 3 * paired_half


def test_fixed_seed_gives_the_same_interval_and_another_seed_a_close_one():
    a, b = _paired_gaussians(200, 0.2, seed=3)
    ones = np.ones_like(a)
    one, again = (paired_interval(a, ones, b, ones, reps=2000, seed=7) for _ in range(2))
    other = paired_interval(a, ones, b, ones, reps=2000, seed=8)
    assert one == again
    assert (one.low, one.high) != (other.low, other.high)
    assert other.low == pytest.approx(one.low, abs=0.2 * (one.high - one.low))
    assert np.array_equal(resample_weights(5, 3, 0).sum(axis=1), [5, 5, 5])  # each replicate draws n units


def test_simulated_coverage_is_near_the_level():
    """Over 300 simulated data sets with a true difference of 0.5, the 90% interval holds it ~90% of the time."""
    covered = 0
    for k in range(300):
        a, b = _paired_gaussians(80, 0.5, seed=100 + k)
        ones = np.ones_like(a)
        got = paired_interval(a, ones, b, ones, reps=1000, level=0.9, seed=k)
        covered += got.low <= 0.5 <= got.high
    assert 0.84 <= covered / 300 <= 0.95


def test_identical_models_are_not_significant_and_a_large_gap_is():
    a, _ = _paired_gaussians(100, 0.0, seed=4)
    ones = np.ones_like(a)
    same = paired_interval(a, ones, a.copy(), ones, reps=500, seed=0)
    assert same.diff == 0 and same.low == 0 and same.high == 0 and not same.significant
    gap = paired_interval(a + 5.0, ones, a, ones, reps=500, seed=0)
    assert gap.significant and gap.low == pytest.approx(5.0)


def _grid(seed: int, prompts: int = 30, images: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    found = rng.integers(0, 6, size=(prompts, images))
    valid = rng.random((prompts, images)) > 0.1
    return found, valid


def test_multigen_values_equal_the_score_stage_mg_and_pairs_are_named_a_minus_b():
    grids = {"sd14": _grid(0), "trained": _grid(1), "step_10": _grid(2)}
    tables = {m: found_table("coco", *g) for m, g in grids.items()}
    cfg = CompareCfg(reps=300, seed=0)
    result = compare_multigen(tables, list(tables), ["coco"], cfg)["coco"]
    for k in range(1, 6):
        for model, (found, valid) in grids.items():
            assert result[f"mg{k}"][model]["value"] == pytest.approx(mg_scores(found, valid)[f"mg{k}"], abs=1e-9)
        pair = result[f"mg{k}"]["trained-sd14"]
        assert pair["diff"] == pytest.approx(result[f"mg{k}"]["trained"]["value"] - result[f"mg{k}"]["sd14"]["value"])
        assert pair["low"] <= pair["diff"] <= pair["high"] and pair["units"] == 30
    assert set(result["mg2"]) == {"sd14", "trained", "step_10", "trained-sd14", "step_10-sd14", "step_10-trained"}


def test_multigen_units_sum_images_per_prompt():
    found = np.array([[2, 0], [1, 3]])
    valid = np.array([[True, True], [False, True]])
    num, den = multigen_units({"m": found_table("coco", found, valid)}, "coco", 1)["m"]
    assert num.tolist() == [100.0, 100.0] and den.tolist() == [2.0, 1.0]


def test_models_on_different_grids_are_refused():
    tables = {"a": found_table("coco", *_grid(0, prompts=3)), "b": found_table("coco", *_grid(0, prompts=4))}
    with pytest.raises(InputDataError, match="b and a were scored on different coco prompts"):
        multigen_units(tables, "coco", 1)


def _pie_table(seed: int, ids: list[str]) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = {"image_id": ids, "editing_type_id": [i % 3 for i in range(len(ids))],
            "status": ["ok"] * (len(ids) - 1) + ["edit_failed"], "error": ""}
    rows.update({metric: rng.random(len(ids)) for metric in PIEBENCH_KEYS})
    table = pd.DataFrame(rows)
    table.loc[0, "psnr_unedit_part"] = np.inf  # as an unedited background gives
    return table


def test_piebench_values_equal_the_table_means_of_summarize():
    ids = [f"{i:04d}" for i in range(12)]
    tables = {"sd14": _pie_table(0, ids), "trained": _pie_table(1, ids[::-1])}  # row order does not matter
    result = compare_piebench(tables, ["sd14", "trained"], PIEBENCH_KEYS, CompareCfg(reps=200))
    for model, table in tables.items():
        summary = summarize(table)
        for metric, (name, _) in PIEBENCH_KEYS.items():
            assert result[name][model]["value"] == pytest.approx(summary[name], rel=1e-12)
    with pytest.raises(InputDataError, match="b and a list different units"):
        piebench_units({"a": _pie_table(0, ids), "b": _pie_table(0, ids[:-1])}, "psnr_unedit_part", 1.0)


def _clip_table(seed: int, captions: int, failed: int | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for reference in ("coco", "flickr30k"):
        scores = 20 + 10 * rng.random(captions)
        if failed is not None:
            scores[failed] = np.nan  # its image failed: not scored
        rows.append(pd.DataFrame({"reference": reference, "prompt_id": np.arange(captions)[::-1],
                                  "clip_score": scores[::-1]}))
    return pd.concat(rows)


def test_clip_score_values_equal_the_means_of_the_scored_captions():
    """The full-sample CLIP score of each model is the mean over its scored captions (what metrics/fid holds);
    the pair's difference is the difference of those means; other captions are refused."""
    tables = {"sd14": _clip_table(0, 30), "trained": _clip_table(1, 30, failed=4)}
    result = compare_clip(tables, ["sd14", "trained"], ["coco", "flickr30k"], CompareCfg(reps=300))
    for reference in ("coco", "flickr30k"):
        means = {m: t[t["reference"] == reference]["clip_score"].mean() for m, t in tables.items()}  # NaN skipped
        assert result[reference]["sd14"]["value"] == pytest.approx(means["sd14"], rel=1e-12)
        assert result[reference]["trained-sd14"]["diff"] == pytest.approx(means["trained"] - means["sd14"], rel=1e-9)
        pair = result[reference]["trained-sd14"]
        assert pair["low"] <= pair["diff"] <= pair["high"] and pair["units"] == 30
    num, den = clip_units(tables, "coco")["trained"]
    assert den.sum() == 29 and num[4] == 0.0
    with pytest.raises(InputDataError, match="clip_score.*b and a list different units"):
        clip_units({"a": _clip_table(0, 30), "b": _clip_table(0, 29)}, "coco")


def test_compare_units_with_one_model_has_no_pairs():
    ones = np.ones(5)
    assert compare_units({"m": (ones, ones)}, ["m"], CompareCfg(reps=10)) == {"m": {"value": 1.0}}


def _detections(seed: int, prompts, images: int) -> list[dict]:
    """Random OWL-ViT rows of each prompt's images: 0-3 boxes per object, some images failed."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt in prompts:
        for index in range(images):
            boxes = rng.integers(0, 4, size=2)
            labels = [0] * boxes[0] + [1] * boxes[1]
            ok = rng.random() > 0.1
            rows.append({"prompt_id": prompt.prompt_id, "image_index": index,
                         "status": STATUS_OK if ok else "no_image", "box_scores": rng.random(len(labels)).tolist(),
                         "box_labels": labels, "box_centers": rng.random((len(labels), 2)).tolist()})
    return rows


def test_visor_values_equal_the_visor_stage_scores():
    prompts = spatial_prompts(load_categories("coco"), max_prompts=40, seed=0)
    records = {m: _detections(seed, prompts, 4) for seed, m in enumerate(("sd14", "trained"))}
    tables = {m: image_outcomes(rows, prompts, 0.3, 4) for m, rows in records.items()}
    result = compare_visor(tables, list(tables), 4, CompareCfg(reps=200, seed=0))
    assert list(result) == visor_metrics(4) == ["oa", "oa_a", "oa_b", "visor_uncond", "visor_cond", "visor_1",
                                                "visor_2", "visor_3", "visor_4"]
    for model, rows in records.items():
        expected = visor_scores(rows, prompts, 0.3, 4)
        for name in result:
            assert result[name][model]["value"] == pytest.approx(expected[name], abs=1e-9), (model, name)
    pair = result["oa"]["trained-sd14"]
    assert pair["units"] == 40 and pair["low"] <= pair["diff"] <= pair["high"]


def test_visor_units_of_a_worked_prompt_and_refused_grids():
    table = pd.DataFrame({"prompt_id": [7, 7, 7, 9], "image_index": [0, 1, 2, 0], "scored": [1, 1, 0, 1],
                          "found_a": [1, 1, 0, 0], "found_b": [1, 0, 0, 1], "right": [1, 0, 0, 0]})
    num, den = visor_units({"m": table}, "visor_cond")["m"]
    assert num.tolist() == [100.0, 0.0] and den.tolist() == [1.0, 0.0]  # prompt 9 has no image with both
    num, den = visor_units({"m": table}, "visor_1")["m"]
    assert num.tolist() == [100.0, 0.0] and den.tolist() == [1.0, 1.0]
    with pytest.raises(InputDataError, match="b and m were scored on different SR2D prompts"):
        visor_units({"m": table, "b": table.iloc[:3]}, "oa")
    with pytest.raises(ValueError, match="unknown VISOR score 'visor_x'"):
        visor_units({"m": table}, "visor_x")


def test_holm_adjusts_a_worked_family_in_input_order():
    """Sorted p 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([float("nan"), 0.01, 0.5])  # NaN is not a test: m = 2
    assert np.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.02, 0.5])
    assert holm([0.6, 0.7]) == [1.0, 1.0] and holm([]) == []


def test_bootstrap_p_agrees_with_the_interval_and_holm_is_stricter():
    assert bootstrap_p(np.zeros(50)) == 1.0 and bootstrap_p(np.full(50, 2.0)) == 0.0
    assert bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == 0.5  # one of four at or below 0, doubled
    agree = 0
    for seed in range(200):
        a, b = _paired_gaussians(60, 0.25, seed=seed)
        ones = np.ones_like(a)
        got = paired_interval(a, ones, b, ones, reps=2000, seed=seed)
        agree += (got.p < 0.05) == got.significant
    assert agree >= 196  # they differ only where a percentile falls between the replicates next to 0
    units = {m: _paired_gaussians(80, delta, seed=7) for m, delta in (("x", 0.0), ("y", 0.3), ("z", 0.6))}
    result = compare_units({m: (u[0], np.ones(80)) for m, u in units.items()}, ["x", "y", "z"],
                           CompareCfg(reps=1000, seed=0))
    pairs = [result[k] for k in ("y-x", "z-x", "z-y")]
    assert all(p["p_holm"] >= p["p"] for p in pairs)
    assert all(p["significant_holm"] == (p["p_holm"] < 0.05) for p in pairs)
    assert sorted(p["p_holm"] for p in pairs) == pytest.approx(holm(sorted(p["p"] for p in pairs)))
