"""Report sections that compare: the summary at the top of the page, the pairwise differences with their
paired-bootstrap intervals (``metrics/compare.json``), this run beside the published spread, and the scores
against training step (``plots/by_step.csv``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.config import ConfigError
from pipeline.figures import lines_with_errors
from pipeline.report.blocks import Figure, Section, Table, Text, fmt, missing, no_negative_zero

MG_SHOWN = (2, 3, 4, 5)
SET_LABELS = {"coco": "COCO", "ade20k": "ADE20K"}
REFERENCE_LABELS = {"coco": "COCO", "flickr30k": "Flickr30K"}  # FID reference sets (CLIP score comparisons)
# PIE-Bench table names and whether higher is better (structure distance, LPIPS and MSE: lower is better)
PIE_HIGHER = {"structure_distance_x1e3": False, "psnr_unedit_part": True, "lpips_unedit_part_x1e3": False,
              "mse_unedit_part_x1e4": False, "ssim_unedit_part_x1e2": True, "clip_similarity_source_image": True,
              "clip_whole": True, "clip_edited": True}
MARK = "✱"        # the interval excludes 0
HOLM_MARK = "†"    # and the difference stays significant after Holm's correction over the pairs of its score
VISOR_LABELS = {"oa": "OA", "oa_a": "OA(A)", "oa_b": "OA(B)", "visor_uncond": "VISOR_uncond",
                "visor_cond": "VISOR_cond"}  # and visor_<k> -> VISOR_<k>
VISOR_SUMMARY = ("oa", "visor_uncond", "visor_cond")  # TokenCompose's Object Accuracy, then VISOR's own


def visor_label(name: str) -> str:
    """``oa`` -> ``OA``, ``visor_2`` -> ``VISOR_2``."""
    return VISOR_LABELS.get(name, name.upper())


def interval_cell(pair: Mapping[str, Any] | None, decimals: int) -> str:
    """``+1.23 [0.40, 2.05]✱†``: the difference, its interval, ✱ when the interval excludes 0 and † when the
    difference also survives Holm's correction over the pairs of its score."""
    if not pair or pair.get("diff") is None:
        return "—"
    low, high = pair.get("low"), pair.get("high")
    bounds = f" [{fmt(low, decimals=decimals)}, {fmt(high, decimals=decimals)}]" if low is not None else ""
    marks = (MARK if pair.get("significant") else "") + (HOLM_MARK if pair.get("significant_holm") else "")
    diff = no_negative_zero(f"{pair['diff']:+.{decimals}f}", signed=True)
    return f"{diff}{bounds}{marks}"


def pair_names(scores: Mapping[str, Any]) -> list[str]:
    """The ``a-b`` pair keys of one score's comparisons (the others are models' own values)."""
    return [key for key, value in scores.items() if isinstance(value, Mapping) and "diff" in value]


def best_two(scores: Mapping[str, Any], higher: bool) -> tuple[list[str], str] | None:
    """(models tied at the best value, best model below them) of one score's comparisons; None when fewer
    than two models have a value or all share one value."""
    valued = [(v["value"], m) for m, v in scores.items() if isinstance(v, Mapping) and "value" in v
              and isinstance(v["value"], (int, float)) and math.isfinite(v["value"])]
    ranked = sorted(valued, key=lambda item: item[0], reverse=higher)
    if len(ranked) < 2:
        return None
    top = [m for v, m in ranked if v == ranked[0][0]]
    below = [m for v, m in ranked if v != ranked[0][0]]
    return (top, below[0]) if below else None


def pair_of(scores: Mapping[str, Any], a: str, b: str) -> tuple[Mapping[str, Any] | None, float]:
    """The comparison of ``a`` and ``b`` oriented as ``a - b`` (sign +1) or found as ``b - a`` (sign -1)."""
    if f"{a}-{b}" in scores:
        return scores[f"{a}-{b}"], 1.0
    return scores.get(f"{b}-{a}"), -1.0


def oriented(pair: Mapping[str, Any] | None, sign: float) -> dict[str, Any] | None:
    """``pair`` with its difference and interval multiplied by ``sign`` (bounds swapped when negative)."""
    if pair is None:
        return None
    low, high = pair.get("low"), pair.get("high")
    bounds = (low, high) if sign > 0 else (None if high is None else -high, None if low is None else -low)
    return {**pair, "diff": sign * pair["diff"], "low": bounds[0], "high": bounds[1]}


def summary_rows(compare: Mapping[str, Any], decimals: int) -> list[list[str]]:
    """One row per MG level and prompt set, and per PIE-Bench column: best model, its value, runner-up, the
    best minus the runner-up with its interval, and whether that gap is beyond the noise."""
    rows = []
    entries = [(f"MultiGen {SET_LABELS.get(s, s)} MG{k}", scores[f"mg{k}"], True)
               for s, scores in ordered_sets(compare.get("multigen", {})) for k in MG_SHOWN if f"mg{k}" in scores]
    entries += [(f"VISOR {visor_label(name)}", compare["visor"][name], True) for name in VISOR_SUMMARY
                if name in compare.get("visor", {})]
    entries += [(f"PIE-Bench {name}", scores, PIE_HIGHER.get(name, True))
                for name, scores in compare.get("piebench", {}).items() if name in PIE_HIGHER]
    entries += [(f"CLIP score {REFERENCE_LABELS.get(name, name)}", scores, True)
                for name, scores in compare.get("clip_score", {}).items()]
    for label, scores, higher in entries:
        top = best_two(scores, higher)
        if top is None:
            continue
        tied, second = top
        best = tied[0]
        gap = oriented(*pair_of(scores, best, second))
        name = best if len(tied) == 1 else f"tie: {', '.join(tied)}"
        rows.append([label, name, fmt(scores[best]["value"], decimals=decimals), second, interval_cell(gap, decimals),
                     "yes" if gap and gap.get("significant") else "no",
                     "—" if not gap or "significant_holm" not in gap else "yes" if gap["significant_holm"] else "no"])
    return rows


def ordered_sets(results: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The prompt sets of a result in the report's order (COCO, ADE20K, then others by name)."""
    known = [name for name in SET_LABELS if name in results]
    return [(name, results[name]) for name in known + sorted(set(results) - set(known))]


def within_spread(metrics: Mapping[str, Mapping[str, Any]], published_rows: Sequence[Mapping[str, Any]],
                  matches: Mapping[str, Sequence[str]], prompt_sets: Sequence[str],
                  decimals: int) -> tuple[list[list[str]], int, int]:
    """(rows, within, checked): for each of this run's models and each published row it reproduces
    (``matches``: model -> published method names), per MG level whether |this run - published| <= the
    published std over image index (✓), else ✗ with the difference."""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for row in published_rows:
        by_method.setdefault(row["method"], []).append(row)
    unknown = [f"{model}: {m!r}" for model, methods in matches.items() for m in methods if m not in by_method]
    if unknown:
        raise ConfigError(f"report.published_rows names MultiGen rows that are not published ({'; '.join(unknown)}); "
                          f"known: {', '.join(sorted(by_method))}")
    rows, inside, checked = [], 0, 0
    for model, methods in matches.items():
        if model not in metrics:
            continue
        for method in methods:
            for row in by_method[method]:
                cells = []
                for name in prompt_sets:
                    for k in MG_SHOWN:
                        ours, theirs, spread = (metrics[model].get(f"{name}_mg{k}"), row.get(f"{name}_mg{k}"),
                                                row.get(f"{name}_mg{k}_std"))
                        if not all(isinstance(v, (int, float)) for v in (ours, theirs, spread)):
                            cells.append("—")
                            continue
                        ok = abs(ours - theirs) <= spread
                        inside, checked = inside + ok, checked + 1
                        cells.append("✓" if ok else f"✗ {no_negative_zero(f'{ours - theirs:+.{decimals}f}', True)}")
                source = f" ({row['source']})" if row.get("source") else ""
                rows.append([model, f"{method}{source}", *cells])
    return rows, inside, checked


def summary_section(compare: Mapping[str, Any] | None, mg_metrics: Mapping[str, Mapping[str, Any]],
                    published_rows: Sequence[Mapping[str, Any]], matches: Mapping[str, Sequence[str]],
                    decimals: int = 2) -> Section:
    """The page's first section: the best model at each score and whether it beats the runner-up beyond the
    noise, then this run's MultiGen scores against the spread of the published rows they reproduce."""
    section = Section("Summary")
    if not compare:
        section.blocks.append(missing("Model comparisons", "metrics/compare.json", "compare"))
        return section
    level = 100 * float(compare.get("level", 0.95))
    rows = summary_rows(compare, decimals)
    beyond = sum(row[-2] == "yes" for row in rows)
    after_holm = sum(row[-1] == "yes" for row in rows)
    section.blocks.append(Text(
        f"Best model at each score (tied models listed together). The gap to the runner-up comes with its "
        f"{level:.0f}% paired-bootstrap interval ({compare.get('reps')} resamples of the MultiGen or SR2D "
        f"prompts, or of the PIE-Bench images, or of the FID captions, the same draw for both models); it is "
        f"beyond the noise ({MARK}) when the interval excludes 0. {beyond} of {len(rows)} best models are beyond "
        f"the noise. Each interval is for one comparison; with many pairs some fall outside by chance, so the "
        f"last column also corrects for the number of pairs of each score (Holm's step-down on the bootstrap "
        f"p-values, familywise error {100 - level:.0f}%; {HOLM_MARK} in the tables): {after_holm} of {len(rows)} "
        f"leads survive it."))
    section.blocks.append(Table("Best model per score (higher is better, except structure distance, LPIPS, MSE)",
                                ["Score", "Best", "Value", "Runner-up", "Best − runner-up [interval]",
                                 "Beyond the noise", "After Holm"], rows, name="summary_best"))
    prompt_sets = [name for name, _ in ordered_sets(compare.get("multigen", {}))]
    spread_rows, inside, checked = within_spread(mg_metrics, published_rows, matches, prompt_sets, decimals)
    if spread_rows:
        columns = ["Model", "Published row"] + [f"{SET_LABELS.get(s, s)} MG{k}" for s in prompt_sets
                                                for k in MG_SHOWN]
        section.blocks.append(Text(
            f"This run against the published rows it reproduces (report.published_rows): ✓ where this run's MG_k "
            f"lies within the published mean ± its published std over image index, else ✗ with this run's "
            f"difference. {inside} of {checked} values lie within. A different detector or model (the demo "
            f"profile's tiny random models) puts every value outside."))
        section.blocks.append(Table("Within the published spread?", columns, spread_rows, name="within_spread"))
    return section


def differences_section(compare: Mapping[str, Any] | None, decimals: int = 2) -> Section:
    """Every pair of models: the difference of each MG level and PIE-Bench column with its interval."""
    section = Section("Differences between models")
    if not compare:
        section.blocks.append(missing("Model comparisons", "metrics/compare.json", "compare"))
        return section
    level = 100 * float(compare.get("level", 0.95))
    section.blocks.append(Text(
        f"Each cell: model a minus model b, then the {level:.0f}% paired-bootstrap interval; {MARK} marks an "
        f"interval that excludes 0 (beyond the noise), {HOLM_MARK} a difference that stays significant after "
        f"Holm's correction over all the pairs of that score. MultiGen resamples prompts (each with all its seeded "
        f"images), VISOR the SR2D prompts (each with its seeded images), PIE-Bench images, CLIP score the FID "
        f"captions (one seeded image each); both models "
        f"are scored on the same draw (metrics/compare.json)."))
    for name, scores in ordered_sets(compare.get("multigen", {})):
        levels = [k for k in MG_SHOWN if f"mg{k}" in scores]
        pairs = pair_names(scores[f"mg{levels[0]}"]) if levels else []
        rows = [[pair.replace("-", " − ", 1), *[interval_cell(scores[f"mg{k}"].get(pair), decimals)
                                                for k in levels]] for pair in pairs]
        section.blocks.append(Table(f"MultiGen {SET_LABELS.get(name, name)}: a − b, percentage points",
                                    ["a − b", *[f"MG{k}" for k in levels]], rows, name=f"differences_{name}"))
    visor = compare.get("visor", {})
    if visor:  # OA, OA(A), OA(B), VISOR_uncond, VISOR_cond, then VISOR_1..J (the JSON's keys are sorted)
        levels = sorted(set(visor) - set(VISOR_LABELS), key=lambda n: int(n.rsplit("_", 1)[1]))
        names = [n for n in VISOR_LABELS if n in visor] + levels
        rows = [[pair.replace("-", " − ", 1), *[interval_cell(visor[n].get(pair), decimals) for n in names]]
                for pair in pair_names(visor[names[0]])]
        section.blocks.append(Table("VISOR (SR2D): a − b, percentage points (prompts resampled)",
                                    ["a − b", *[visor_label(n) for n in names]], rows, name="differences_visor"))
    piebench = {n: s for n, s in compare.get("piebench", {}).items() if n in PIE_HIGHER}
    if piebench:
        names = list(piebench)
        pairs = pair_names(piebench[names[0]])
        rows = [[pair.replace("-", " − ", 1), *[interval_cell(piebench[n].get(pair), decimals) for n in names]]
                for pair in pairs]
        section.blocks.append(Table("PIE-Bench: a − b, table units", ["a − b", *names], rows,
                                    name="differences_piebench"))
    clip = compare.get("clip_score", {})
    if clip:
        names = list(clip)
        rows = [[pair.replace("-", " − ", 1), *[interval_cell(clip[n].get(pair), decimals) for n in names]]
                for pair in pair_names(clip[names[0]])]
        section.blocks.append(Table("CLIP score of the FID images: a − b (captions resampled)",
                                    ["a − b", *[REFERENCE_LABELS.get(n, n) for n in names]], rows,
                                    name="differences_clip_score"))
    return section


def by_step_section(csv: Path) -> Section:
    """MG2–MG5 (std over image index as error bars), VISOR, grounding share, PIE-Bench values and FID against
    training step."""
    section = Section("Scores against training step")
    if not Path(csv).is_file():
        section.blocks.append(missing("Scores by step", str(csv), "by_step"))
        return section
    table = pd.read_csv(csv)
    section.blocks.append(Text(
        "Step 0 is the base model, the last step the trained UNet, the steps between the exported checkpoints "
        "(checkpoint_steps). Values also in plots/by_step.csv (`dvc plots show` draws them)."))
    steps = table["step"].to_numpy(dtype=float)
    panels: dict[str, dict[str, tuple]] = {}
    for name, label in SET_LABELS.items():
        series = {f"MG{k}": (steps, table[f"{name}_mg{k}"].to_numpy(float), table[f"{name}_mg{k}_std"].to_numpy(float))
                  for k in MG_SHOWN if f"{name}_mg{k}" in table}
        if series:
            panels[f"MultiGen {label} (%)"] = series
    nan = np.full(len(table), np.nan)
    visor_columns = {"visor_oa": "OA", "visor_uncond": "VISOR_uncond", "visor_cond": "VISOR_cond"}
    visor = {label: (steps, table[c].to_numpy(float), nan) for c, label in visor_columns.items()
             if c in table and table[c].notna().any()}
    if visor:
        panels["VISOR on SR2D (%)"] = visor
    if "grounding_share_mean" in table:
        panels["Grounding share"] = {"share": (steps, table["grounding_share_mean"].to_numpy(float), nan)}
    for column in ("psnr_unedit_part", "clip_whole", "clip_edited", "structure_distance_x1e3"):
        if column in table and table[column].notna().any():
            panels[f"PIE-Bench {column}"] = {column: (steps, table[column].to_numpy(float), nan)}
    fids = {c[len("fid_"):]: (steps, table[c].to_numpy(float), nan) for c in table.columns
            if c.startswith("fid_") and table[c].notna().any()}
    if fids:
        panels["FID (lower: more realistic)"] = fids
    section.blocks.append(Figure("Scores against training step", lines_with_errors(panels, "training step"),
                                 "by_step.png"))
    shown = ["step", "model"] + [c for c in table.columns if c.endswith(("mg2", "mg5")) or c == "grounding_share_mean"
                                 or c.startswith("fid_") or c == "visor_oa"]
    section.blocks.append(Table("Scores against training step (MG2, MG5, VISOR's OA, the grounding share and FID)",
                                shown,
                                [[fmt(v, decimals=3) if isinstance(v, float) else str(v) for v in row]
                                 for row in table[shown].itertuples(index=False)], name="by_step"))
    return section
