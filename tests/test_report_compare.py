"""The report's summary, pairwise differences, published-spread check and by-step figure."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.config import ConfigError
from pipeline.report.blocks import Figure, Table
from pipeline.report.comparisons import (by_step_section, differences_section, interval_cell, summary_rows,
                                         summary_section, within_spread)


def _scores(values: dict[str, float], pairs: dict[str, tuple[float, float, float]], holm: bool = True) -> dict:
    """Compare results of one score; ``holm``: each significant pair also survives Holm's correction."""
    out = {m: {"value": v} for m, v in values.items()}
    out.update({p: {"diff": d, "low": lo, "high": hi, "significant": lo > 0 or hi < 0, "units": 10,
                    "significant_holm": holm and (lo > 0 or hi < 0)} for p, (d, lo, hi) in pairs.items()})
    return out


COMPARE = {
    "level": 0.95, "reps": 100,
    "multigen": {"coco": {f"mg{k}": _scores({"sd14": 50.0, "trained": 60.0}, {"trained-sd14": (10.0, 4.0, 16.0)})
                          for k in range(1, 6)}},
    "piebench": {"structure_distance_x1e3": _scores({"sd14": 30.0, "trained": 20.0},
                                                    {"trained-sd14": (-10.0, -12.0, 1.0)})},
    "clip_score": {"coco": _scores({"sd14": 31.0, "trained": 30.5}, {"trained-sd14": (-0.5, -0.9, -0.1)},
                                   holm=False)},
    "visor": {name: _scores({"sd14": 30.0, "trained": 33.0}, {"trained-sd14": (3.0, -1.0, 7.0)})
              for name in ("oa", "oa_a", "visor_10", "visor_2", "visor_cond", "visor_uncond")},  # sorted, as in JSON
}


def test_interval_cell_marks_intervals_that_exclude_zero():
    assert interval_cell({"diff": 1.5, "low": 0.2, "high": 2.0, "significant": True}, 2) == "+1.50 [0.20, 2.00]✱"
    assert interval_cell({"diff": -0.1, "low": -1.0, "high": 0.5, "significant": False}, 1) == "-0.1 [-1.0, 0.5]"
    assert interval_cell(None, 2) == "—"
    assert interval_cell({"diff": -1e-15, "low": -2e-16, "high": 0.5, "significant": False}, 2) == "+0.00 [0.00, 0.50]"


def test_summary_picks_the_best_by_direction_and_orients_the_gap():
    rows = {row[0]: row for row in summary_rows(COMPARE, 2)}
    assert rows["MultiGen COCO MG2"][1:4] == ["trained", "60.00", "sd14"]
    assert rows["MultiGen COCO MG2"][4:] == ["+10.00 [4.00, 16.00]✱†", "yes", "yes"]
    structure = rows["PIE-Bench structure_distance_x1e3"]  # lower is better: trained best, gap not beyond noise
    assert structure[1] == "trained" and structure[3] == "sd14"
    assert structure[4:] == ["-10.00 [-12.00, 1.00]", "no", "no"]
    clip = rows["CLIP score COCO"]  # higher is better: sd14 best, the gap oriented best minus runner-up
    assert clip[1:4] == ["sd14", "31.00", "trained"] and clip[4:] == ["+0.50 [0.10, 0.90]✱", "yes", "no"]
    visor = [row for row in summary_rows(COMPARE, 2) if row[0].startswith("VISOR")]
    assert [row[0] for row in visor] == ["VISOR OA", "VISOR VISOR_uncond", "VISOR VISOR_cond"]  # not OA(A), _k
    assert visor[0][1:] == ["trained", "33.00", "sd14", "+3.00 [-1.00, 7.00]", "no", "no"]
    old_format = {"multigen": {"coco": {"mg2": {**COMPARE["multigen"]["coco"]["mg2"], "trained-sd14": {
        k: v for k, v in COMPARE["multigen"]["coco"]["mg2"]["trained-sd14"].items() if k != "significant_holm"}}}}}
    assert summary_rows(old_format, 2)[0][-1] == "—"  # a compare.json written before Holm's correction


def test_ties_are_listed_together_and_an_all_equal_score_has_no_row():
    tie = {"multigen": {"coco": {"mg2": _scores({"a": 5.0, "b": 5.0, "c": 1.0},
                                                {"b-a": (0.0, 0.0, 0.0), "c-a": (-4.0, -5.0, -3.0),
                                                 "c-b": (-4.0, -5.0, -3.0)}),
                                 "mg3": _scores({"a": 1.0, "b": 1.0}, {"b-a": (0.0, 0.0, 0.0)})}}}
    rows = summary_rows(tie, 1)
    assert rows == [["MultiGen COCO MG2", "tie: a, b", "5.0", "c", "+4.0 [3.0, 5.0]✱†", "yes", "yes"]]


def test_within_spread_checks_each_level_against_the_published_std():
    metrics = {"trained": {"coco_mg2": 98.0, "coco_mg3": 70.0, "coco_mg4": 28.9, "coco_mg5": None}}
    published = [{"method": "TokenCompose", "source": "README", "coco_mg2": 98.08, "coco_mg2_std": 0.40,
                  "coco_mg3": 76.16, "coco_mg3_std": 1.04, "coco_mg4": 28.81, "coco_mg4_std": 0.95,
                  "coco_mg5": 3.28, "coco_mg5_std": 0.48}]
    rows, inside, checked = within_spread(metrics, published, {"trained": ["TokenCompose"]}, ["coco"], 2)
    assert rows == [["trained", "TokenCompose (README)", "✓", "✗ -6.16", "✓", "—"]]
    assert (inside, checked) == (2, 3)
    with pytest.raises(ConfigError, match="'TokenCompse'.*known: TokenCompose"):
        within_spread(metrics, published, {"trained": ["TokenCompse"]}, ["coco"], 2)


def test_summary_and_differences_sections_hold_their_tables():
    summary = summary_section(COMPARE, {}, [], {}, 2)
    assert [b.name for b in summary.blocks if isinstance(b, Table)] == ["summary_best"]
    assert "5 of 9 best models are beyond the noise" in summary.blocks[0].text
    diffs = differences_section(COMPARE, 2)
    tables = {b.name: b for b in diffs.blocks if isinstance(b, Table)}
    assert tables["differences_coco"].rows == [["trained − sd14"] + ["+10.00 [4.00, 16.00]✱†"] * 4]
    assert tables["differences_piebench"].columns == ["a − b", "structure_distance_x1e3"]
    assert tables["differences_clip_score"].columns == ["a − b", "COCO"]
    assert tables["differences_clip_score"].rows == [["trained − sd14", "-0.50 [-0.90, -0.10]✱"]]
    assert tables["differences_visor"].columns == ["a − b", "OA", "OA(A)", "VISOR_uncond", "VISOR_cond", "VISOR_2",
                                                   "VISOR_10"]
    assert tables["differences_visor"].rows == [["trained − sd14"] + ["+3.00 [-1.00, 7.00]"] * 6]
    assert summary_section(None, {}, [], {}).blocks[0].kind == "missing"


def test_by_step_section_draws_the_steps(tmp_path):
    table = pd.DataFrame({"step": [0, 10, 30], "model": ["sd14", "step_10", "trained"],
                          **{f"coco_mg{k}{s}": [1.0, 2.0, 3.0] for k in range(1, 6) for s in ("", "_std")},
                          "grounding_share_mean": [0.5, 0.6, None], "psnr_unedit_part": [None, None, None],
                          "fid_coco": [30.0, None, 25.0], "visor_oa": [29.9, 31.0, 33.5]})
    table.to_csv(tmp_path / "by_step.csv", index=False)
    section = by_step_section(tmp_path / "by_step.csv")
    figure = next(b for b in section.blocks if isinstance(b, Figure))
    assert figure.png.startswith(b"\x89PNG")
    rows = next(b for b in section.blocks if isinstance(b, Table)).rows
    assert [r[:2] for r in rows] == [["0", "sd14"], ["10", "step_10"], ["30", "trained"]]
    table_block = next(b for b in section.blocks if isinstance(b, Table))
    assert table_block.columns[-2:] == ["fid_coco", "visor_oa"]
    assert [r[-2:] for r in rows] == [["30.000", "29.900"], ["—", "31.000"], ["25.000", "33.500"]]  # FID, OA
    assert by_step_section(tmp_path / "none.csv").blocks[0].kind == "missing"
