"""Report: published numbers against the SPEC tables, tables and figures on the page, a headless browser."""

from __future__ import annotations

import base64
import io
import math
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import figures
from pipeline.config import InputDataError
from pipeline.names import PIEBENCH_KEYS
from pipeline.report import sections as report_sections
from pipeline.report.blocks import Figure, Section, Table, Text, fmt
from pipeline.report.page import build_sections, profile_banner
from pipeline.report.published import load_published
from pipeline.report.render import EMBED_PNG_LIMIT, embedded_image, write_report
from pipeline.report.sections import (MG_SETS, PIE_COLUMNS, PIE_HEADERS, REPORTED_MG_LEVELS, categories_section,
                                      editing_types, multigen_chart, multigen_section, piebench_section,
                                      piebench_type_chart, read_category_tables, visor_section)

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO.parent / "shared" / "reference" / "SPEC.md"
PUBLISHED = REPO / "data" / "published.yaml"
CHROMIUM = Path("/usr/bin/chromium")


# --- published numbers against the SPEC ------------------------------------------------------------

def _spec_table(heading: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first Markdown table after the SPEC heading ``heading``."""
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} not present (the shared reference folder sits beside the checkout)")
    lines = SPEC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif seen:
            break
    return [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]


def _clean(name: str) -> str:
    return re.sub(r"[*†]", "", name).strip()


def test_published_multigen_matches_spec_3_7():
    spec = _spec_table("### 3.7")
    rows = {r["method"]: r for r in load_published(PUBLISHED)["multigen"]["rows"]}
    names = {"SD 1.4": "SD 1.4", "Attend-and-Excite": "Attend-and-Excite", "TokenCompose": "TokenCompose"}
    assert len(spec) == 3 and {s[0] for s in spec} == set(names)
    for cells in spec:
        row = rows[names[cells[0]]]
        assert row["oa"] == float(cells[1])
        for cell, (key, level) in zip(cells[2:], [(s, k) for s in ("coco", "ade20k") for k in (2, 3, 4, 5)]):
            mean, std = re.fullmatch(r"([\d.]+)\(([\d.]+)\)", cell).groups()
            assert (row[f"{key}_mg{level}"], row[f"{key}_mg{level}_std"]) == (float(mean), float(std)), cell


def test_published_fid_and_latency_match_the_spec():
    """SPEC §3.7 quotes the README's FID and latency for SD 1.4, TokenCompose and A&E; the rows hold them."""
    spec = SPEC.read_text() if SPEC.is_file() else pytest.skip(f"{SPEC} not present")
    line = re.search(r"Also in README: (.*)", spec).group(1)
    rows = {r["method"]: r for r in load_published(PUBLISHED)["multigen"]["rows"]}
    coco, flickr, latency = (re.search(rf"{what} (?:SD1.4 )?([\d.]+)(?: s)? vs (?:TC )?([\d.]+)", line).groups()
                             for what in (r"FID\(COCO\)", r"FID\(Flickr30K\)", "latency"))
    for key, (sd, tc) in (("fid_coco", coco), ("fid_flickr30k", flickr), ("latency_s", latency)):
        assert (rows["SD 1.4"][key], rows["TokenCompose"][key]) == (float(sd), float(tc)), key
    assert rows["Attend-and-Excite"]["latency_s"] == float(re.search(r"A&E ([\d.]+) s", line).group(1))
    assert {"Composable", "Layout", "Structured"} <= {name.split()[0] for name in rows}


def test_published_multigen_rows_are_consistent():
    """A transcription check on every row (three are not in the SPEC): MG_k falls with k, stds are small and
    positive, and each row has every key the report reads."""
    for row in load_published(PUBLISHED)["multigen"]["rows"]:
        for s in ("coco", "ade20k"):
            means = [row[f"{s}_mg{k}"] for k in (2, 3, 4, 5)]
            assert means == sorted(means, reverse=True) and all(0 < row[f"{s}_mg{k}_std"] < 5 for k in (2, 3, 4, 5))
        assert {"oa", "fid_coco", "fid_flickr30k", "latency_s", "latency_s_std"} <= set(row), row["method"]


def test_published_piebench_matches_spec_5_7():
    spec = _spec_table("### 5.7")
    published = load_published(PUBLISHED)["piebench"]["rows"]
    assert len(spec) == len(published) == 11
    for cells, row in zip(spec, published):
        assert (_clean(cells[0]), _clean(cells[1])) == (row["inversion"], row["editing"])
        assert [float(c) for c in cells[2:]] == [row[key] for key, _ in PIE_COLUMNS]
        assert ("base" in row) == cells[1].endswith("*")
        assert ("note" in row) == ("†" in cells[0])


def test_piebench_headers_are_the_spec_columns_and_units():
    """The page's column headers (metric and scale) are SPEC §5.7's, in its order (units checked against the
    SPEC, not against the report's own table)."""
    lines = SPEC.read_text(encoding="utf-8").splitlines() if SPEC.is_file() else pytest.skip(f"{SPEC} not present")
    start = next(i for i, line in enumerate(lines) if line.startswith("### 5.7"))
    header = next(line for line in lines[start:] if line.startswith("|"))
    spec_columns = [c.strip() for c in header.strip().strip("|").split("|")][2:]
    shown = [h.rstrip(" ↑↓").replace("Structure", "Struct") for _, h in PIE_COLUMNS]
    assert shown == spec_columns
    factors = {"Struct ×10³": 1e3, "PSNR": 1, "LPIPS ×10³": 1e3, "MSE ×10⁴": 1e4, "SSIM ×10²": 1e2,
               "CLIP Whole": 1, "CLIP Edited": 1}
    assert [factors[c] for c in spec_columns] == [PIEBENCH_KEYS[m][1] for m in PIE_HEADERS]


def test_bars_hatch_published_series_only_and_draw_error_bars(monkeypatch):
    import matplotlib.axes

    drawn = []
    real_bar = matplotlib.axes.Axes.bar

    def recording_bar(ax, x, height, width, **kwargs):
        drawn.append((kwargs.get("hatch"), kwargs.get("yerr")))  # one call per series, in the panel's order
        return real_bar(ax, x, height, width, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    panels = {"COCO": {"this run": ([50.0, 10.0], [2.0, 1.0]), "SD 1.4 (published)": ([90.7, 50.7], [1.3, 0.9]),
                       "no spread": ([40.0, 5.0], [math.nan, math.nan])}}
    png = figures.grouped_bars(panels, ["MG2", "MG3"], hatched={"SD 1.4 (published)"})
    assert png.startswith(b"\x89PNG")
    assert len(drawn) == 3
    hatch = dict(zip(panels["COCO"], (h for h, _ in drawn)))
    assert hatch == {"this run": None, "SD 1.4 (published)": "//", "no spread": None}
    errors = dict(zip(panels["COCO"], (e for _, e in drawn)))
    assert list(errors["this run"]) == [2.0, 1.0] and errors["no spread"] is None


def test_published_sources_cite_spec_commits():
    spec = SPEC.read_text() if SPEC.is_file() else pytest.skip(f"{SPEC} not present")
    published = load_published(PUBLISHED)
    for part, short in (("multigen", "TC"), ("piebench", "PNP")):
        src = published[part]["source"]
        match = re.search(rf"\| {short} \| `([^`]+)`\s*\| `([0-9a-f]{{40}})`", spec)
        assert match and (src["repository"], src["commit"]) == match.groups()
    assert "repository" not in published["study"]["source"]  # the study is not in the SPEC: no commit to check
    visor = re.search(r"\| VISOR \| `([^`]+)` .*\| `([0-9a-f]{8})…` \|", spec)
    src = published["visor"]["source"]
    assert visor and src["repository"] == visor.group(1) and src["commit"].startswith(visor.group(2))


def test_published_visor_oa_is_the_value_both_readmes_give():
    """SPEC §3.6: the TokenCompose README's SD 1.4 OA (29.86) is VISOR's own SD row."""
    spec = SPEC.read_text() if SPEC.is_file() else pytest.skip(f"{SPEC} not present")
    published = load_published(PUBLISHED)
    sd = published["visor"]["rows"][0]
    assert "SD1.4 = 29.86 in TC README equals VISOR README's \"SD\" OA 29.86" in spec
    assert sd["oa"] == published["multigen"]["rows"][0]["oa"] == 29.86
    assert sd["visor_uncond"] == pytest.approx(sd["visor_cond"] * sd["oa"] / 100, abs=0.01)  # VISOR's own identity


# --- the follow-up study's own tables against the shared copy -------------------------------------

STUDY_PIE_KEYS = {"psnr": "psnr_unedit_part", "lpips_x1e3": "lpips_unedit_part_x1e3",
                  "mse_x1e4": "mse_unedit_part_x1e4", "ssim_x1e2": "ssim_unedit_part_x1e2"}  # study -> ours
MG_KEYS = [f"{s}_mg{k}{suffix}" for s in MG_SETS for k in REPORTED_MG_LEVELS for suffix in ("", "_std")]
STUDY_MG_LABEL, STUDY_PIE_LABEL = "published (reproduction study, Table 1)", "published (reproduction study, Table 2)"


def _study_tables(shared_data: Path) -> dict:
    """The study's published tables as the shared data folder keeps them (``study/tables.yaml``)."""
    path = shared_data / "study" / "tables.yaml"
    if not path.is_file():
        pytest.skip(f"{path} not present (the study's published tables, kept in the shared data folder)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _by_name(rows: list[dict], name: str = "method") -> dict[str, dict]:
    """``{row[name]: the row's other keys}``, in the rows' order."""
    return {row[name]: {k: v for k, v in row.items() if k != name} for row in rows}


def test_published_study_numbers_equal_the_shared_tables(shared_data):
    """Every number of the study's rows is the shared copy's, with nothing left out or added, rows in the
    study's order; MultiGen keys are the report's, PIE-Bench columns renamed to ours."""
    tables = _study_tables(shared_data)
    study = load_published(PUBLISHED)["study"]
    assert study["source"]["name"] == tables["source"] and "study/tables.yaml" in study["source"]["copied_from"]
    expected = {row["model"]: {f"{s}_mg{level[2:]}{suffix}": pair[i] for s in MG_SETS
                               for level, pair in row[s].items() for i, suffix in enumerate(("", "_std"))}
                for row in tables["table1_multigen"]["rows"]}
    multigen = _by_name(study["multigen"]["rows"])
    assert list(multigen) == list(expected) and multigen == expected
    assert all(sorted(values) == sorted(MG_KEYS) for values in multigen.values())
    expected = {row["model"]: {STUDY_PIE_KEYS.get(k, k): v for k, v in row["values"].items()}
                for row in tables["table2_piebench"]["rows"]}
    piebench = _by_name(study["piebench"]["rows"])
    assert list(piebench) == list(expected) and piebench == expected
    assert all(sorted(values) == sorted(key for key, _ in PIE_COLUMNS) for values in piebench.values())
    table2 = tables["table2_piebench"]
    assert set(table2["columns"]) == {k for row in table2["rows"] for k in row["values"]}  # no column left out


def test_study_caveats_state_what_its_rows_show():
    """The caveats the page prints are true of the transcribed rows: the study's Original row is the README's
    TokenCompose row, its Attend-and-Excite row differs in exactly two COCO stds, and its Direct Inversion + P2P
    row differs from PnPInversion's only in CLIP Whole, on another scale like the SD1.4 backbone's."""
    published = load_published(PUBLISHED)
    readme, study = _by_name(published["multigen"]["rows"]), published["study"]
    mg = _by_name(study["multigen"]["rows"])
    assert {k: mg["TokenCompose (Original)"][k] for k in MG_KEYS} == {k: readme["TokenCompose"][k] for k in MG_KEYS}
    ae, ae_readme = mg["Attend-and-Excite"], readme["Attend-and-Excite"]
    assert {k for k in MG_KEYS if ae[k] != ae_readme[k]} == {"coco_mg3_std", "coco_mg4_std"}
    caveat = study["multigen"]["caveat"]
    for level in (3, 4):
        key = f"coco_mg{level}_std"
        assert f"MG{level} {ae[key]:.2f} vs {ae_readme[key]:.2f}" in caveat
    pie = _by_name(study["piebench"]["rows"])
    pnp = next(r for r in published["piebench"]["rows"] if (r["inversion"], r["editing"]) == ("DirectInversion", "P2P"))
    direct = pie["Direct Inversion + P2P"]
    assert {key for key, _ in PIE_COLUMNS if direct[key] != pnp[key]} == {"clip_whole"}
    caveat = study["piebench"]["caveat"]
    assert f"prints as {pnp['clip_whole']:.2f}" in caveat
    assert all(f"{row['clip_whole']:.2f}" in caveat for row in pie.values())
    assert pie["Blended Latent Diffusion (TokenCompose)"]["clip_whole"] > 25 > pie["Blended Latent Diffusion (SD1.4)"][
        "clip_whole"]


def test_study_part_is_checked_when_loaded(tmp_path):
    """A ``study`` without its source or one of its tables is refused with the part named."""
    data = yaml.safe_load(PUBLISHED.read_text(encoding="utf-8"))
    for broken, message in ((dict(data["study"], source={"name": "x"}), "'study' needs a 'source'"),
                            ({k: v for k, v in data["study"].items() if k != "piebench"}, "'study.piebench' needs"),
                            ({"note": "not recorded"}, "'study' needs a 'source'")):
        path = tmp_path / "published.yaml"
        path.write_text(yaml.safe_dump(dict(data, study=broken)), encoding="utf-8")
        with pytest.raises(InputDataError, match=re.escape(message)):
            load_published(path)


# --- tables ----------------------------------------------------------------------------------------

def _mg_metrics(base: float) -> dict:
    values = {"num_prompts": 6, "images_per_prompt": 2, "det_threshold": 0.1, "model": "embedded:tiny-sd"}
    for s in ("coco", "ade20k"):
        for k in range(1, 6):
            values[f"{s}_mg{k}"], values[f"{s}_mg{k}_std"] = base / k, 1.0 / k
    return values


def test_multigen_section_lines_up_run_and_published_rows():
    published = load_published(PUBLISHED)
    section = multigen_section({"sd14": _mg_metrics(60.0)}, published["multigen"], "demo")
    coco = next(b for b in section.blocks if isinstance(b, Table) and b.name == "multigen_coco")
    assert coco.columns == ["Model", "Source", "MG2", "MG3", "MG4", "MG5"]
    assert coco.rows[0] == ["sd14", "this run (demo)", "30.00(0.50)", "20.00(0.33)", "15.00(0.25)",
                            "12.00(0.20)"]
    assert coco.rows[6][0] == "TokenCompose" and coco.rows[6][2] == "98.08(0.40)"
    assert coco.rows[2] == ["Composable Diffusion", "published (mlpc-ucsd/TokenCompose)", "63.33(0.59)",
                            "21.87(1.01)", "3.25(0.45)", "0.23(0.18)"]
    assert not [b for b in section.blocks if isinstance(b, Table) and "FID" in " ".join(b.columns)]  # own section
    prov = next(b for b in section.blocks if isinstance(b, Table) and b.caption.startswith("MultiGen: what"))
    assert prov.columns == ["Setting", "sd14"]  # one model: one column of its settings
    assert prov.rows == [["det_threshold", "0.1"], ["images_per_prompt", "2"], ["model", "embedded:tiny-sd"],
                         ["num_prompts", "6"]]
    assert coco.rows[1][1] == "published (mlpc-ucsd/TokenCompose)"
    chart = [b for b in section.blocks if isinstance(b, Figure)]
    assert [b.name for b in chart] == ["multigen_chart.png"] and chart[0].png.startswith(b"\x89PNG")
    assert not [b for b in multigen_section({}, published["multigen"], "demo").blocks
                if isinstance(b, Figure)]  # no chart without this run's numbers


def test_multigen_chart_reads_every_model_and_published_row(monkeypatch):
    """The chart gets, per prompt set, MG2-MG5 and their stds of each model and of each published row (hatched);
    a key missing from a metrics file is NaN (no bar), not an error."""
    published = load_published(PUBLISHED)["multigen"]
    seen = {}
    monkeypatch.setattr(report_sections, "grouped_bars", lambda panels, categories, hatched, **kw: seen.update(
        panels=panels, categories=categories, hatched=hatched) or b"")
    partial = {k: v for k, v in _mg_metrics(60.0).items() if k != "ade20k_mg5"}
    multigen_chart({"sd14": _mg_metrics(60.0), "trained": partial}, published, "demo")
    assert seen["categories"] == ["MG2", "MG3", "MG4", "MG5"]
    assert list(seen["panels"]) == ["MultiGen COCO", "MultiGen ADE20K"]
    coco = seen["panels"]["MultiGen COCO"]
    assert coco["sd14 (demo)"][0] == [30.0, 20.0, 15.0, 12.0]
    assert coco["sd14 (demo)"][1] == pytest.approx([1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert coco["TokenCompose (published)"][0][0] == 98.08 and coco["TokenCompose (published)"][1][0] == 0.40
    assert np.isnan(seen["panels"]["MultiGen ADE20K"]["trained (demo)"][0][3])
    assert seen["hatched"] == {f"{r['method']} (published)" for r in published["rows"]}


def test_multigen_section_adds_the_study_rows_after_the_readme_rows():
    """With the study, each MultiGen table gains its Table 1 rows in the study's order, labelled as the study's,
    after the unchanged rows of this run and of the README; the section cites the study and prints its caveat."""
    published = load_published(PUBLISHED)
    study = published["study"]
    metrics = {"sd14": _mg_metrics(60.0)}
    before = {b.name: b for b in multigen_section(metrics, published["multigen"], "demo").blocks
              if isinstance(b, Table) and b.name}
    section = multigen_section(metrics, published["multigen"], "demo", study=study)
    after = {b.name: b for b in section.blocks if isinstance(b, Table) and b.name}
    for key in MG_SETS:
        old, new = before[f"multigen_{key}"].rows, after[f"multigen_{key}"].rows
        assert new[:len(old)] == old and len(new) == len(old) + 5
        assert [r[0] for r in new[len(old):]] == [r["method"] for r in study["multigen"]["rows"]]
        assert {r[1] for r in new[len(old):]} == {STUDY_MG_LABEL} and STUDY_MG_LABEL not in {r[1] for r in old}
    assert after["multigen_coco"].rows[-4] == ["TokenCompose (Checkpoint A)", STUDY_MG_LABEL, "97.15(0.47)",
                                               "76.15(1.01)", "29.43(0.68)", "3.66(0.42)"]
    assert after["multigen_ade20k"].rows[-1] == ["TokenCompose (Retrained)", STUDY_MG_LABEL, "96.50(0.43)",
                                                 "75.99(1.02)", "33.45(1.30)", "5.87(0.57)"]
    texts = [b for b in section.blocks if isinstance(b, Text)]
    assert [b.text for b in texts if b.kind == "note"] == [study["multigen"]["caveat"]]
    assert any(b.text.startswith("Study rows: TokenCompose reproduction study (report), Table 1 and Table 2; "
                                 "copied from the project's shared data") for b in texts)


def test_multigen_chart_gets_a_hatched_bar_per_study_row_and_level(monkeypatch):
    """Counted as the grouped-bars test counts them: one Axes.bar call per series and panel. The study adds
    five hatched series (legend "<method> (study)") to each of the two panels, after the README's."""
    import matplotlib.axes

    published = load_published(PUBLISHED)
    drawn = []
    real_bar = matplotlib.axes.Axes.bar

    def recording_bar(ax, x, height, width, **kwargs):
        drawn.append((kwargs.get("hatch"), len(x)))
        return real_bar(ax, x, height, width, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    metrics = {"sd14": _mg_metrics(60.0), "trained": _mg_metrics(70.0)}
    counts = {}
    for name, study in (("without", None), ("with", published["study"])):
        drawn.clear()
        assert multigen_chart(metrics, published["multigen"], "demo", study).startswith(b"\x89PNG")
        counts[name] = (len(drawn), sum(h == "//" for h, _ in drawn), {n for _, n in drawn})
    assert counts["without"] == (2 * (2 + 6), 2 * 6, {4})
    assert counts["with"] == (2 * (2 + 6 + 5), 2 * (6 + 5), {4})  # every series: MG2-MG5, four bars

    seen = {}
    monkeypatch.setattr(report_sections, "grouped_bars", lambda panels, categories, hatched, **kw: seen.update(
        panels=panels, hatched=hatched) or b"")
    multigen_chart(metrics, published["multigen"], "demo", published["study"])
    coco = seen["panels"]["MultiGen COCO"]
    study_names = [f"{r['method']} (study)" for r in published["study"]["multigen"]["rows"]]
    assert list(coco)[-5:] == study_names and set(study_names) <= seen["hatched"]
    assert "Attend-and-Excite (published)" in coco and "Attend-and-Excite (study)" in coco  # both A&E rows
    assert coco["TokenCompose (Checkpoint B) (study)"] == ([96.53, 75.54, 27.27, 2.82], [0.55, 1.22, 1.76, 0.40])


def test_piebench_section_adds_the_study_rows_after_pnpinversions():
    published = load_published(PUBLISHED)
    study = published["study"]
    old = next(b for b in piebench_section({}, published["piebench"], "demo").blocks if isinstance(b, Table)).rows
    section = piebench_section({}, published["piebench"], "demo", study=study)
    rows = next(b for b in section.blocks if isinstance(b, Table)).rows
    assert rows[:11] == old and [r[0] for r in rows[11:]] == ["Direct Inversion + P2P",
                                                              "Blended Latent Diffusion (SD1.4)",
                                                              "Blended Latent Diffusion (TokenCompose)"]
    assert {r[1] for r in rows[11:]} == {STUDY_PIE_LABEL} and STUDY_PIE_LABEL not in {r[1] for r in old}
    assert rows[-1][2:] == ["56.61", "28.46", "39.19", "23.63", "86.08", "26.02", "23.23"]  # SPEC §5.6 order
    assert rows[12][2:] == ["56.47", "28.44", "38.64", "23.85", "86.05", "18.55", "22.80"]
    assert [b.text for b in section.blocks if isinstance(b, Text) and b.kind == "note"] == [study["piebench"]["caveat"]]


def test_visor_section_puts_this_runs_scores_beside_the_published_oa():
    published = load_published(PUBLISHED)
    values = {"oa": 40.0, "oa_a": 70.0, "oa_b": 55.5, "visor_uncond": 20.0, "visor_cond": 50.0, "visor_1": 30.0,
              "visor_2": 20.0, "visor_3": 10.0, "visor_4": 5.0, "prompts": 4, "detector": "embedded:tiny-owlvit"}
    section = visor_section({"trained": values}, published["visor"], published["multigen"], "demo")
    table = next(b for b in section.blocks if isinstance(b, Table) and b.name == "visor")
    assert table.columns[:5] == ["Model", "Source", "OA", "OA(A)", "OA(B)"] and table.columns[-1] == "VISOR_4"
    assert table.rows[0][:5] == ["trained", "this run (demo)", "40.00", "70.00", "55.50"]
    assert table.rows[1] == ["SD (VISOR)", "published (microsoft/VISOR)", "29.86", "—", "—", "18.81", "62.98",
                             "46.60", "20.11", "6.89", "1.63"]
    assert table.rows[7] == ["TokenCompose", "published (mlpc-ucsd/TokenCompose)", "52.15"] + ["—"] * 8
    assert [r[0] for r in table.rows[2:7]] == ["SD 1.4", "Composable Diffusion", "Layout Guidance",
                                               "Structured Diffusion", "Attend-and-Excite"]
    assert len(table.rows) == 8
    six = visor_section({"m": dict(values, visor_5=1.0, visor_6=0.0)}, published["visor"],
                               published["multigen"], "demo")
    assert next(b for b in six.blocks if isinstance(b, Table)).columns[-2:] == ["VISOR_5", "VISOR_6"]
    prov = next(b for b in section.blocks if isinstance(b, Table) and b.caption.startswith("VISOR: what"))
    assert prov.columns == ["Setting", "trained"] and prov.rows == [["detector", "embedded:tiny-owlvit"], ["prompts", "4"]]
    empty = visor_section({}, published["visor"], published["multigen"], "demo")
    notes = [b.text for b in empty.blocks if isinstance(b, Text) and b.kind == "missing"]
    assert notes and "dvc repro visor" in notes[0]


def test_piebench_type_chart_has_every_column_per_type_and_backbone(monkeypatch):
    """Types in id order with their PIE-Bench names; a type one backbone lacks is NaN (no bar) for it; no
    per-type keys, no chart."""
    seen = {}
    monkeypatch.setattr(report_sections, "grouped_bars", lambda panels, categories, **kw: seen.update(
        panels=panels, categories=categories, **kw) or b"png")
    metrics = {"base": {"type_6.clip_whole": 0.4, "type_1.clip_whole": 0.2, "type_1.scored": 3, "clip_whole": 0.3},
               "trained": {"type_1.clip_whole": 0.25, "type_1.scored": 3}}
    assert editing_types(metrics) == ["1", "6"]
    assert piebench_type_chart(metrics) == b"png"
    assert seen["categories"] == ["change object", "change color"]
    assert list(seen["panels"]) == [header for _, header in PIE_COLUMNS]
    whole = seen["panels"]["CLIP Whole ↑"]
    assert whole["base"][0] == [0.2, 0.4] and whole["trained"][0][0] == 0.25 and np.isnan(whole["trained"][0][1])
    assert all(np.isnan(whole["base"][1])) and seen["sharey"] is False  # no per-type std; own scale per column
    assert piebench_type_chart({"base": {"clip_whole": 0.3}}) is None
    section = piebench_section(metrics, load_published(PUBLISHED)["piebench"], "demo")
    assert [b.name for b in section.blocks if isinstance(b, Figure)] == ["piebench_types.png"]


def _categories(rates: dict[str, float], prompt_set: str = "coco"):
    import pandas as pd

    return pd.DataFrame({"prompt_set": prompt_set, "category": list(rates), "images": 4,
                         "found": [r / 25 for r in rates.values()], "rate": list(rates.values())})


def test_category_chart_shows_the_categories_that_differ_most(monkeypatch):
    """Largest spread between models first (ties by name); a category one model lacks is NaN for it; one
    model alone: its least found categories; no tables: a note naming the stage."""
    seen = {}
    monkeypatch.setattr(report_sections, "grouped_bars", lambda panels, categories, **kw: seen.update(
        panels=panels, categories=categories) or b"png")
    tables = {"sd14": _categories({"cat": 50.0, "dog": 100.0, "cup": 0.0, "kite": 25.0}),
              "trained": _categories({"cat": 75.0, "dog": 0.0, "cup": 0.0})}
    section = categories_section(tables, size=3)
    assert [b.name for b in section.blocks if isinstance(b, Figure)] == ["categories_coco.png"]
    assert seen["categories"] == ["dog (n=4)", "cat (n=4)", "cup (n=4)"]  # spreads 100, 25, 0 (kite: one model)
    (panel,) = seen["panels"].values()
    assert panel["sd14"][0] == [100.0, 50.0, 0.0] and panel["trained"][0] == [0.0, 75.0, 0.0]
    categories_section({"sd14": tables["sd14"]}, size=2)
    assert seen["categories"] == ["cup (n=4)", "kite (n=4)"]
    nan_model = {"sd14": tables["sd14"], "broken": _categories({"cat": float("nan"), "dog": float("nan")})}
    categories_section(nan_model, size=2)  # a model without any rate: drawn without bars, no crash
    assert seen["categories"] == ["cup (n=4)", "kite (n=4)"] and np.isnan(seen["panels"][next(iter(
        seen["panels"]))]["broken"][0]).all()
    empty = categories_section({})
    assert any(b.kind == "missing" and "dvc repro score" in b.text for b in empty.blocks if isinstance(b, Text))


def test_category_names_are_read_as_text(tmp_path):
    """Names that look like numbers or like NA stay names, the same in every model's file."""
    folder = tmp_path / "cats"
    folder.mkdir()
    _categories({"1": 50.0, "NA": 10.0}).to_csv(folder / "a.csv", index=False)
    _categories({"1": 40.0, "x": 10.0}).to_csv(folder / "b.csv", index=False)
    tables = read_category_tables(folder)
    assert list(tables["a"]["category"]) == ["1", "NA"] and list(tables["b"]["category"]) == ["1", "x"]
    assert read_category_tables(tmp_path / "absent") == {}


def test_attention_figures_of_one_prompt_sit_together(tmp_path):
    folder = tmp_path / "plots" / "attention"
    folder.mkdir(parents=True)
    for name in ("sd14_0", "sd14_1", "trained_0", "trained_1", "tokencompose_a_10", "tokencompose_a_2", "notes"):
        (folder / f"{name}.png").write_bytes(_png((1, 2, 3)))
    sections = build_sections(tmp_path, load_published(PUBLISHED), "demo")
    shown = [b.caption.rsplit("/", 1)[1] for s in sections for b in s.blocks
             if isinstance(b, Figure) and "plots/attention" in b.caption]
    assert shown == ["sd14_0.png", "trained_0.png", "sd14_1.png", "trained_1.png", "tokencompose_a_2.png",
                     "tokencompose_a_10.png", "notes.png"]


def test_missing_inputs_are_named_not_hidden():
    published = load_published(PUBLISHED)
    section = piebench_section({}, published["piebench"], "demo")
    notes = [b.text for b in section.blocks if isinstance(b, Text) and b.kind == "missing"]
    assert notes and "metrics/piebench/<backbone>.json" in notes[0] and "dvc repro piebench" in notes[0]
    table = next(b for b in section.blocks if isinstance(b, Table))
    assert len(table.rows) == 11  # the published rows are still shown


def test_fmt_handles_missing_and_nan():
    assert fmt(None) == "—" and fmt(float("nan"), 1.0) == "—"
    assert fmt(1.0, None) == "1.00" and fmt(1.005, 0.25, decimals=1) == "1.0(0.2)"


# --- rendering and the browser ---------------------------------------------------------------------

def _png(color: tuple[int, int, int], size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(size=(900, 700)) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_large_figures_are_inlined_as_jpeg():
    small = _png((1, 2, 3))
    assert embedded_image(small) == ("image/png", small)
    big = _noise_png((2000, 500))
    assert len(big) > EMBED_PNG_LIMIT
    mime, data = embedded_image(big)
    image = Image.open(io.BytesIO(data))
    assert mime == "image/jpeg" and image.format == "JPEG" and image.size == (1600, 400) and len(data) < len(big)


def _sections() -> list[Section]:
    table = Table("numbers <&>", ["Model", "Source", "x|y"], [["a", "b", "1.00"], ["c", "d", "2.00"]], "t1")
    figs = [Figure(f"figure {i}", _png((40 * i, 90, 200)), f"f{i}.png") for i in range(3)]
    return [Section("One", [Text("intro"), table, figs[0]]),
            Section("Two", [Text("absent", kind="missing"), *figs[1:],
                                   Table("second", ["A", "B"], [["1", "2"]], "t2")])]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images, self.links, self.sections = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "table":
            self.tables.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])


def test_html_is_self_contained_and_markdown_twin_matches(tmp_path):
    counts = write_report(tmp_path, "Report", _sections(), banner="demo profile")
    assert counts == {"sections": 2, "tables": 2, "figures": 3, "missing_inputs": 1}
    page = (tmp_path / "index.html").read_text()
    parsed = _Collect()
    parsed.feed(page)
    assert parsed.tables == ["t1", "t2"]
    assert parsed.links == [f"#{i}" for i in parsed.sections] == ["#s0", "#s1"]  # the contents: in-page links only
    assert "numbers &lt;&amp;&gt;" in page and "http" not in page
    decoded = [base64.b64decode(img["src"].removeprefix("data:image/png;base64,")) for img in parsed.images]
    assert decoded == [b.png for s in _sections() for b in s.blocks if isinstance(b, Figure)]
    md = (tmp_path / "README.md").read_text()
    assert "| a | b | 1.00 |" in md and "x\\|y" in md and "> **demo profile**" in md
    for i in range(3):
        assert f"](figures/f{i}.png)" in md and (tmp_path / "figures" / f"f{i}.png").read_bytes() == decoded[i]


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def test_page_in_headless_chromium(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("headless browser check needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium); CI installs it")
    sections = _sections() + [Section("Big", [Figure("noise", _noise_png(), "big.png")])]
    write_report(tmp_path / "report", "Report", sections, banner="demo profile")
    url = (tmp_path / "report" / "index.html").as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Collect()
    parsed.feed(dom.stdout)
    assert parsed.tables == ["t1", "t2"] and len(parsed.images) == 4
    assert parsed.images[3]["src"].startswith("data:image/jpeg;base64,")
    assert [img.get("data-decoded") for img in parsed.images] == ["1"] * 4, "browser failed to decode an image"
    assert 'id="profile-banner"' in dom.stdout
    shot = tmp_path / "report.png"
    run = _chromium(["--window-size=1200,900", f"--screenshot={shot}", url], tmp_path)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 0  # not a blank page (kept in tmp_path)


# --- the whole page from pipeline outputs -----------------------------------------------------------

def _write_outputs(root: Path) -> None:
    import json

    import pandas as pd

    (root / "metrics" / "multigen").mkdir(parents=True)
    (root / "metrics" / "multigen" / "sd14.json").write_text(json.dumps(_mg_metrics(50.0)))
    (root / "metrics" / "visor").mkdir()
    (root / "metrics" / "visor" / "sd14.json").write_text(json.dumps({"oa": 30.0, "visor_uncond": 10.0}))
    (root / "metrics" / "piebench").mkdir()
    pie = {key: 1.0 + i for i, (key, _) in enumerate(PIE_COLUMNS)}
    pie.update({"backbone": "base", "scored": 6, "type_0.clip_whole": 3.0, "clip_whole.n": 6, "clip_whole.nan": 0})
    (root / "metrics" / "piebench" / "base.json").write_text(json.dumps(pie))
    (root / "metrics" / "grounding").mkdir()
    (root / "metrics" / "grounding" / "sd14.json").write_text(json.dumps(
        {"share_up_16": 0.25, "share_down_64": 0.5, "share_mean": 0.375, "mask_area_mean": 0.125, "categories": 10}))
    (root / "metrics" / "train.json").write_text(json.dumps({"steps": 30, "loss_final": 0.1}))
    (root / "plots" / "attention").mkdir(parents=True)
    pd.DataFrame({"step": [1, 2, 3], "loss": [1.0, 0.8, 0.7], "token": [0.5, 0.4, 0.3]}).to_csv(
        root / "plots" / "train_curves.csv", index=False)
    (root / "plots" / "attention" / "sd14_0.png").write_bytes(_png((200, 10, 10)))
    (root / "plots" / "edits").mkdir()
    (root / "plots" / "edits" / "base.png").write_bytes(_png((10, 200, 10)))
    pd.DataFrame({"step": [0, 30], "model": ["sd14", "trained"], "coco_mg2": [50.0, 60.0],
                  "coco_mg2_std": [1.0, 1.0]}).to_csv(root / "plots" / "by_step.csv", index=False)
    pair = {"diff": 10.0, "low": 2.0, "high": 18.0, "significant": True, "units": 2}
    (root / "metrics" / "compare.json").write_text(json.dumps({"level": 0.95, "reps": 10, "multigen": {"coco": {
        f"mg{k}": {"sd14": {"value": 50.0}, "trained": {"value": 60.0}, "trained-sd14": pair} for k in range(1, 6)}},
        "piebench": {}}))
    (root / "plots" / "samples").mkdir()
    (root / "plots" / "samples" / "coco.png").write_bytes(_png((10, 10, 200)))
    (root / "plots" / "multigen_categories").mkdir()
    _categories({"cat": 50.0, "dog": 25.0}).to_csv(root / "plots" / "multigen_categories" / "sd14.csv", index=False)
    (root / "metrics" / "fid").mkdir()
    (root / "metrics" / "fid" / "sd14.json").write_text(json.dumps({"coco": {"fid": 21.0}, "flickr30k": {"fid": 70.0}}))
    (root / "metrics" / "latency").mkdir()
    (root / "metrics" / "latency" / "sd14.json").write_text(json.dumps({"original": {"seconds_per_image": 7.0}}))


def test_build_sections_from_pipeline_outputs(tmp_path):
    _write_outputs(tmp_path)
    published = load_published(PUBLISHED)
    sections = build_sections(tmp_path, published, "demo")
    tables = {b.name: b for s in sections for b in s.blocks if isinstance(b, Table) and b.name}
    assert set(tables) >= {"multigen_coco", "multigen_ade20k", "photorealism", "visor", "piebench",
                           "grounding", "train"}
    assert tables["visor"].rows[0][:6] == ["sd14", "this run (demo)", "30.00", "—", "—", "10.00"]
    assert tables["photorealism"].rows[0][:4] == ["sd14", "this run (demo)", "21.00", "70.00"]
    assert tables["piebench"].rows[0] == ["BLD, base backbone", "this run (demo)",
                                          "1.00", "2.00", "3.00", "4.00", "5.00", "6.00", "7.00"]
    assert tables["grounding"].columns == ["Model", "down_64", "up_16", "mean", "chance"]  # SD1.4 group order
    assert tables["grounding"].rows == [["sd14", "0.500", "0.250", "0.375", "0.125"]]
    prov = [b for s in sections for b in s.blocks if isinstance(b, Table) and b.caption.startswith("PIE-Bench: what")]
    assert prov[0].columns == ["Setting", "base"]  # per-type and .n left out
    assert prov[0].rows == [["backbone", "base"], ["clip_whole.nan", "0"], ["scored", "6"]]
    figures = [b.name for s in sections for b in s.blocks if isinstance(b, Figure)]
    assert figures == ["multigen_chart.png", "samples_coco.png", "categories_coco.png", "piebench_types.png",
                       "edits_base.png", "train_curves.png", "by_step.png", "attention_sd14_0.png"]
    assert sections[0].title == "Summary" and tables["summary_best"].rows[0][:2] == ["MultiGen COCO MG2", "trained"]
    assert tables["differences_coco"].rows == [["trained − sd14"] + ["+10.00 [2.00, 18.00]✱"] * 4]
    texts = [b for s in sections for b in s.blocks if isinstance(b, Text)]
    study = published["study"]
    notes = [b.text for b in texts if b.kind == "note"]
    assert notes[0] == study["multigen"]["caveat"] and notes[2:] == [study["piebench"]["caveat"]]
    assert notes[1].startswith("FID differences carry no interval")  # photorealism, between the two
    assert "Study tables" not in [s.title for s in sections]  # the study's numbers are rows of the tables now
    assert [r[1] for r in tables["multigen_coco"].rows[-5:]] == ["published (reproduction study, Table 1)"] * 5
    assert [r[1] for r in tables["piebench"].rows[-3:]] == ["published (reproduction study, Table 2)"] * 3
    assert not [b.text for b in texts if b.kind == "missing"]  # every input present


def test_build_sections_names_every_missing_input(tmp_path):
    sections = build_sections(tmp_path, load_published(PUBLISHED), "paper")
    notes = " ".join(b.text for s in sections for b in s.blocks if isinstance(b, Text) and b.kind == "missing")
    for path in ("metrics/multigen/<model>.json", "metrics/piebench/<backbone>.json", "plots/edits/<backbone>.png",
                 "metrics/compare.json", "plots/by_step.csv",
                 "metrics/train.json", "train_curves.csv", "plots/attention/<model>_<i>.png",
                 "metrics/grounding/<model>.json", "plots/samples/<set>.png",
                 "plots/multigen_categories/<model>.csv"):
        assert path in notes
    assert "meaningless" in profile_banner("demo") and "meaningless" not in profile_banner("paper")


def test_missing_published_file_names_the_param(tmp_path):
    with pytest.raises(FileNotFoundError, match="set report.published in params.yaml"):
        load_published(tmp_path / "publshed.yaml")


class _TableRows(HTMLParser):
    """``{table id: [[cell text, ...], ...]}`` of a page's table bodies."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self._table, self._cell = None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = self.rows.setdefault(dict(attrs).get("id") or "", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag == "td":
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._table[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None


def test_rendered_page_and_markdown_hold_the_study_rows(tmp_path):
    """The written page and its twin show the study's rows under the study's label; no "not recorded" section."""
    _write_outputs(tmp_path)
    published = load_published(PUBLISHED)
    write_report(tmp_path / "report", "Report", build_sections(tmp_path, published, "demo"), banner="demo")
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    parsed = _TableRows()
    parsed.feed(page)
    rows = {t: [r for r in body if r] for t, body in parsed.rows.items()}
    study = published["study"]
    for table, part, label in (("multigen_coco", "multigen", STUDY_MG_LABEL),
                               ("multigen_ade20k", "multigen", STUDY_MG_LABEL),
                               ("piebench", "piebench", STUDY_PIE_LABEL)):
        names = [r["method"] for r in study[part]["rows"]]
        assert [r[:2] for r in rows[table] if r[1] == label] == [[n, label] for n in names]
        assert rows[table][-len(names):] == [r for r in rows[table] if r[1] == label]  # last, in the study's order
    assert ["Blended Latent Diffusion (SD1.4)", STUDY_PIE_LABEL, "56.47", "28.44", "38.64", "23.85", "86.05",
            "18.55", "22.80"] in rows["piebench"]
    assert study["piebench"]["caveat"].replace("'", "&#x27;") in page and "not recorded" not in page
    md = (tmp_path / "report" / "README.md").read_text(encoding="utf-8")
    assert (f"| TokenCompose (Checkpoint B) | {STUDY_MG_LABEL} | 97.26(0.20) | 76.52(1.18) | 34.17(1.37) | "
            "5.92(0.62) |") in md
    assert (f"| Direct Inversion + P2P | {STUDY_PIE_LABEL} | 11.65 | 27.22 | 54.55 | 32.86 | 84.76 | 18.02 | "
            "22.10 |") in md
    assert md.count(STUDY_MG_LABEL) == 10 and md.count(STUDY_PIE_LABEL) == 3
    assert "## Study tables" not in md and f"> {study['multigen']['caveat']}" in md


def test_provenance_is_a_table_of_settings_not_a_dump():
    """Settings every model shares appear once (setting | value); those that differ get a column per model;
    results-table keys and nested values are left out, and a model without a key shows a dash."""
    from pipeline.report.blocks import provenance_table

    metrics = {"sd14": {"mg2": 1.0, "threshold": 0.1, "model": "embedded:tiny-sd", "unet": "", "per_type": {}},
               "trained": {"mg2": 2.0, "threshold": 0.1, "model": "embedded:tiny-sd",
                           "unet": "artifacts/train/unet", "steps": 4}}
    shared, differ = provenance_table("MultiGen", metrics, ["mg2"])
    assert shared.columns == ["Setting", "Value"]
    assert shared.rows == [["model", "embedded:tiny-sd"], ["threshold", "0.1"]]
    assert differ.columns == ["Setting", "sd14", "trained"]
    assert differ.rows == [["steps", "—", "4"], ["unet", "—", "artifacts/train/unet"]]
    alone = provenance_table("MultiGen", {"sd14": metrics["sd14"]}, ["mg2"])
    assert len(alone) == 1 and alone[0].columns == ["Setting", "sd14"] and ["threshold", "0.1"] in alone[0].rows
    assert provenance_table("MultiGen", {"sd14": {"mg2": 1.0}}, ["mg2"]) == []
