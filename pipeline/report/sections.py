"""The sections of the results page: this run's numbers beside the published ones, and their charts.

Builders (:func:`multigen_section`, :func:`piebench_section`, ...) read the metrics the evaluation stages
write; where an input is missing the section says which file and which stage produces it, so a partial
pipeline still gives a readable page.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from pipeline.datasets.piebench_files import EDITING_TYPES
from pipeline.figures import curves_figure, grouped_bars
from pipeline.names import GROUP_ORDER, MG_LEVELS, PIEBENCH_KEYS
from pipeline.report.blocks import Figure, Section, Table, Text, fmt, missing, provenance_table
from pipeline.report.published import citation, source_label, study_blocks, study_label

REPORTED_MG_LEVELS = (2, 3, 4, 5)  # the levels the TokenCompose README and the study report
MG_SETS = {"coco": "COCO", "ade20k": "ADE20K"}
# PIE-Bench columns in SPEC §5.6 order: raw metric -> header; keys are the table-scaled names of
# metrics/piebench/<backbone>.json (pipeline.names.PIEBENCH_KEYS), which data/published.yaml uses too.
PIE_HEADERS = {
    "structure_distance": "Structure ×10³ ↓",
    "psnr_unedit_part": "PSNR ↑",
    "lpips_unedit_part": "LPIPS ×10³ ↓",
    "mse_unedit_part": "MSE ×10⁴ ↓",
    "ssim_unedit_part": "SSIM ×10² ↑",
    "clip_similarity_target_image": "CLIP Whole ↑",
    "clip_similarity_target_image_edit_part": "CLIP Edited ↑",
}
PIE_COLUMNS = tuple((PIEBENCH_KEYS[metric][0], header) for metric, header in PIE_HEADERS.items())


def published_opening(title: str, published: Mapping[str, Any], study: Mapping[str, Any] | None, part: str,
                      absent: Text | None) -> Section:
    """A section that opens with the published rows' note and citation, then the study's blocks of ``part``
    when ``study`` is given, then ``absent`` (the note on this run's missing metrics) when there is one."""
    section = Section(title)
    section.blocks += [Text(published["note"]), citation(published["source"])]
    if study:
        section.blocks += study_blocks(study, part)
    if absent is not None:
        section.blocks.append(absent)
    return section


def multigen_section(metrics: Mapping[str, Mapping[str, Any]], published: Mapping[str, Any],
                     profile: str, decimals: int = 2, study: Mapping[str, Any] | None = None) -> Section:
    """MultiGen MG2–MG5 per prompt set: this run's models, then the published rows (SPEC §3.7), then the
    study's Table 1 rows when ``study`` (the ``study`` part of the published numbers) is given."""
    section = published_opening("MultiGen (TokenCompose Table / study Table 1)", published, study, "multigen",
                                missing("MultiGen scores", "metrics/multigen/<model>.json", "score") if not metrics
                                else None)
    reference = published_mg_rows(published, study)
    shown: set[str] = set()
    for key, label in MG_SETS.items():
        columns = ["Model", "Source"] + [f"MG{k}" for k in REPORTED_MG_LEVELS]
        rows = []
        for model, values in metrics.items():
            shown |= {f"{key}_mg{k}{s}" for k in MG_LEVELS for s in ("", "_std")}
            rows.append([model, f"this run ({profile})", *_mg_cells(values, key, decimals)])
        rows += [[row["method"], source, *_mg_cells(row, key, decimals)] for row, source, _ in reference]
        section.blocks.append(Table(f"MultiGen {label}: mean(std) over image index, %", columns, rows,
                                    name=f"multigen_{key}"))
    if metrics:
        section.blocks.append(Figure("MultiGen MG2–MG5 per model, mean over image index with its std as error "
                                     "bars; published rows hatched",
                                     multigen_chart(metrics, published, profile, study), "multigen_chart.png"))
        section.blocks.extend(provenance_table("MultiGen: what each row of this run was computed over",
                                               metrics, shown))
    return section


def published_mg_rows(published: Mapping[str, Any],
                      study: Mapping[str, Any] | None = None) -> list[tuple[Mapping[str, Any], str, str]]:
    """(row, Source column, chart legend tag) of every published MultiGen row: the TokenCompose README's
    ("published"), then, with ``study``, the study's Table 1 rows in its order ("study")."""
    rows = [(row, source_label(published["source"]), "published") for row in published["rows"]]
    if study:
        rows += [(row, study_label(study, "multigen"), "study") for row in study["multigen"]["rows"]]
    return rows


def _mg_cells(values: Mapping[str, Any], key: str, decimals: int) -> list[str]:
    """MG2–MG5 of prompt set ``key`` as ``mean(std)`` cells; "—" where a value is missing."""
    return [fmt(values.get(f"{key}_mg{k}"), values.get(f"{key}_mg{k}_std"), decimals) for k in REPORTED_MG_LEVELS]


def _number(value: Any) -> float:
    """``value`` as a float; NaN for a missing or non-numeric value (a bar chart leaves it out)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def multigen_chart(metrics: Mapping[str, Mapping[str, Any]], published: Mapping[str, Any], profile: str,
                   study: Mapping[str, Any] | None = None) -> bytes:
    """Bars of MG2–MG5 per prompt set: this run's models, then the published rows and, with ``study``, the
    study's Table 1 rows (both hatched; legend ``<method> (published)`` and ``<method> (study)``)."""
    def series(values: Mapping[str, Any], key: str) -> tuple[list[float], list[float]]:
        return ([_number(values.get(f"{key}_mg{k}")) for k in REPORTED_MG_LEVELS],
                [_number(values.get(f"{key}_mg{k}_std")) for k in REPORTED_MG_LEVELS])

    reference = {f"{row['method']} ({tag})": row for row, _, tag in published_mg_rows(published, study)}
    panels = {}
    for key, label in MG_SETS.items():
        panel = {f"{model} ({profile})": series(values, key) for model, values in metrics.items()}
        panel.update({name: series(row, key) for name, row in reference.items()})
        panels[f"MultiGen {label}"] = panel
    return grouped_bars(panels, [f"MG{k}" for k in REPORTED_MG_LEVELS], set(reference), ylabel="%", per_row=1)


CATEGORY_CHART_SIZE = 15  # categories per prompt set in the per-category chart


def read_category_tables(directory: str | Path) -> dict[str, pd.DataFrame]:
    """``{model: table}`` of every ``plots/multigen_categories/<model>.csv`` (empty when the folder is absent)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    # category names are text, also when they look like numbers or like "NA"
    return {p.stem: pd.read_csv(p, dtype={"prompt_set": str, "category": str}, keep_default_na=False)
            for p in sorted(directory.glob("*.csv"))}


def most_different_categories(rates: pd.DataFrame, size: int = CATEGORY_CHART_SIZE) -> list[str]:
    """The ``size`` categories (rows of ``rates``: category x model, in %) whose found rate differs most
    between models (largest max - min, NaN ignored; ties by name); with one model, the least found ones."""
    spread = rates.max(axis=1) - rates.min(axis=1) if rates.shape[1] > 1 else -rates.iloc[:, 0]
    order = pd.DataFrame({"spread": spread, "name": rates.index}).sort_values(["spread", "name"],
                                                                               ascending=[False, True])
    return list(order["name"][:size])


def categories_section(tables: Mapping[str, pd.DataFrame], size: int = CATEGORY_CHART_SIZE) -> Section:
    """Per prompt set, the found rate of the categories that differ most between models, as bars."""
    section = Section("MultiGen per category")
    section.blocks.append(Text(
        "Found rate of a category = share of the scored images whose prompt names it in which the detector "
        "found it (the MG_k rule: a box labelled with it scores above the threshold). Shown: per prompt set, "
        f"the {size} categories whose rate differs most between the models of this run (with one model: the "
        f"{size} found least often); every category is in plots/multigen_categories/<model>.csv (columns "
        "prompt_set, category, images, found, rate)."))
    if not tables:
        section.blocks.append(missing("Per-category rates", "plots/multigen_categories/<model>.csv", "score"))
        return section
    long = pd.concat([t.assign(model=m) for m, t in tables.items()], ignore_index=True)
    for key, label in MG_SETS.items():
        part = long[long["prompt_set"] == key]
        if part.empty:
            continue
        models = list(dict.fromkeys(part["model"]))
        rates = part.pivot_table(index="category", columns="model", values="rate", aggfunc="first",
                                 dropna=False).reindex(columns=models)
        rates = rates.dropna(how="all")
        if rates.empty:
            continue
        images = part.groupby("category")["images"].max()
        chosen = most_different_categories(rates.dropna(axis=1, how="all"), size)  # models with rates choose
        panel = {model: ([_number(rates.at[c, model]) if model in rates else math.nan for c in chosen],
                         [math.nan] * len(chosen)) for model in tables}
        png = grouped_bars({f"MultiGen {label}: found rate per category, %": panel},
                           [f"{c} (n={images[c]})" for c in chosen], ylabel="%", per_row=1)
        section.blocks.append(Figure(f"MultiGen {label}: found rate per category (n: scored images whose prompt "
                                     "names the category, the largest over the models when failed images differ)",
                                     png, f"categories_{key}.png"))
    return section


VISOR_COLUMNS = (("oa", "OA"), ("oa_a", "OA(A)"), ("oa_b", "OA(B)"), ("visor_uncond", "VISOR_uncond"),
                 ("visor_cond", "VISOR_cond"))


def visor_section(metrics: Mapping[str, Mapping[str, Any]], published: Mapping[str, Any],
                  tokencompose: Mapping[str, Any], profile: str, decimals: int = 2) -> Section:
    """VISOR scores on SR2D per model beside VISOR's own SD row and the TokenCompose README's OA column
    (SPEC §3.6). ``published``: the ``visor`` part of the published numbers; ``tokencompose``: the
    ``multigen`` part (its rows carry ``oa``)."""
    section = Section("VISOR on SR2D spatial prompts (TokenCompose Table, OA column)")
    section.blocks.append(Text(
        "OA = share of images in which both objects of a two-object spatial prompt (\"a cat to the left of a "
        "dog\") are detected, in %; VISOR_uncond / VISOR_cond = share of all / of both-detected images whose "
        "box centres are in the prompted relation; VISOR_k = share of prompts with at least k such images. "
        + published["note"] + " The TokenCompose README gives OA only and does not say how its other OA values "
        "were computed. This run's rows: the detector, prompts and images in the table below."))
    section.blocks += [citation(published["source"]), citation(tokencompose["source"])]
    if not metrics:
        section.blocks.append(missing("VISOR scores", "metrics/visor/<model>.json", "visor"))
    levels = max([4] + [int(k.split("_")[1]) for v in metrics.values() for k in v if re.fullmatch(r"visor_\d+", k)])
    columns = list(VISOR_COLUMNS) + [(f"visor_{k}", f"VISOR_{k}") for k in range(1, levels + 1)]

    def cells(values: Mapping[str, Any]) -> list[str]:
        return [fmt(values.get(key), decimals=decimals) for key, _ in columns]

    rows = [[model, f"this run ({profile})", *cells(values)] for model, values in metrics.items()]
    for part in (published, tokencompose):
        rows += [[r["method"], source_label(part["source"]), *cells(r)] for r in part["rows"]]
    section.blocks.append(Table("VISOR on SR2D, %", ["Model", "Source", *[h for _, h in columns]], rows,
                                name="visor"))
    if metrics:
        section.blocks.extend(provenance_table("VISOR: what each row of this run was computed over", metrics,
                                               {key for key, _ in columns}))
    return section


def piebench_section(metrics: Mapping[str, Mapping[str, Any]], published: Mapping[str, Any],
                     profile: str, decimals: int = 2, study: Mapping[str, Any] | None = None) -> Section:
    """PIE-Bench metrics per editing backbone beside the published rows (SPEC §5.6–5.7) and, when ``study``
    (the ``study`` part of the published numbers) is given, the study's Table 2 rows."""
    section = published_opening("PIE-Bench editing (Blended Latent Diffusion; study Table 2)", published, study,
                                "piebench", missing("PIE-Bench metrics", "metrics/piebench/<backbone>.json",
                                                    "piebench") if not metrics else None)
    columns = ["Method", "Source"] + [header for _, header in PIE_COLUMNS]
    rows = [[f"BLD, {backbone} backbone", f"this run ({profile})", *_pie_cells(values, decimals)]
            for backbone, values in metrics.items()]
    source = source_label(published["source"])
    rows += [[_pie_name(row), source, *_pie_cells(row, decimals)] for row in published["rows"]]
    if study:
        label = study_label(study, "piebench")
        rows += [[row["method"], label, *_pie_cells(row, decimals)] for row in study["piebench"]["rows"]]
    section.blocks.append(Table("PIE-Bench: means over edited images", columns, rows, name="piebench"))
    if metrics:
        overall = {b: {k: v for k, v in m.items() if not k.startswith("type_") and not k.endswith(".n")}
                   for b, m in metrics.items()}  # per-editing-type means: in the chart below and the metrics file
        section.blocks.extend(provenance_table("PIE-Bench: what each row of this run was computed over",
                                               overall, [key for key, _ in PIE_COLUMNS]))
    chart = piebench_type_chart(metrics)
    if chart is not None:
        section.blocks.append(Figure("PIE-Bench per editing type: each column's mean over the scored edits of "
                                     "that type, per backbone (types without a scored edit left out; counts as "
                                     "type_<id>.scored in metrics/piebench/<backbone>.json)", chart,
                                     "piebench_types.png"))
    return section


def _pie_name(row: Mapping[str, Any]) -> str:
    """``<inversion> + <editing>`` of a PnPInversion row, its footnotes (base model, note) in brackets."""
    name = f"{row['inversion']} + {row['editing']}"
    extras = [x for x in (row.get("base"), row.get("note")) if x]
    return f"{name} ({'; '.join(extras)})" if extras else name


def _pie_cells(values: Mapping[str, Any], decimals: int) -> list[str]:
    """The PIE-Bench columns of one row, formatted; "—" where a value is missing."""
    return [fmt(values.get(key), decimals=decimals) for key, _ in PIE_COLUMNS]


def editing_types(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The editing type ids with per-type means in any backbone's metrics (``type_<id>.<key>``), in id order."""
    found = {k.split(".", 1)[0].removeprefix("type_") for values in metrics.values() for k in values
             if k.startswith("type_") and "." in k}
    return sorted(found, key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))


def piebench_type_chart(metrics: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """Bars of every PIE-Bench column per editing type and backbone; ``None`` without per-type means."""
    types = editing_types(metrics)
    if not types:
        return None
    names = [EDITING_TYPES[t][1] if t in EDITING_TYPES else f"type {t}" for t in types]
    panels = {header: {backbone: ([_number(values.get(f"type_{t}.{key}")) for t in types], [math.nan] * len(types))
                       for backbone, values in metrics.items()}
              for key, header in PIE_COLUMNS}
    return grouped_bars(panels, names, per_row=4, sharey=False)


def grounding_section(metrics: Mapping[str, Mapping[str, Any]], decimals: int = 3) -> Section:
    """Share of each category token's attention inside its Grounded-SAM mask, per model and group."""
    section = Section("Attention grounding on generated images")
    section.blocks.append(Text(
        "For each generated MultiGen image, the cross-attention of each category's tokens (summed over its "
        "sub-tokens, averaged over heads, layers and denoising steps) is compared with that category's mask "
        "from Grounded-SAM on the same image: share = attention inside the mask / all attention. 1.0 means "
        "all attention lies on the object; the chance column, the masks' mean share of the image, is what "
        "attention spread evenly would give. Each model is scored on its own images and masks, so compare a "
        "model's shares with its own chance. Categories Grounded-SAM does not find are counted, not scored."))
    if not metrics:
        section.blocks.append(missing("Grounding shares", "metrics/grounding/<model>.json", "grounding_eval"))
        return section
    groups = [g for g in GROUP_ORDER if any(f"share_{g}" in values for values in metrics.values())]
    keys = [f"share_{g}" for g in groups] + ["share_mean", "mask_area_mean"]
    rows = [[model, *[fmt(values.get(k), decimals=decimals) for k in keys]] for model, values in metrics.items()]
    section.blocks.append(Table("Mean attention share inside the object mask", ["Model", *groups, "mean", "chance"],
                                rows, name="grounding"))
    section.blocks.extend(provenance_table("Grounding: what each row was computed over", metrics, keys))
    return section


def training_section(metrics: Mapping[str, Any] | None, curves_csv: Path) -> Section:
    """The training run's summary (``metrics/train.json``) and its loss curves (``plots/train_curves.csv``)."""
    section = Section("Training")
    if metrics is None:
        section.blocks.append(missing("Training summary", "metrics/train.json", "train"))
    else:
        rows = [[k, str(v)] for k, v in sorted(metrics.items()) if not isinstance(v, (dict, list))]
        section.blocks.append(Table("Training run (metrics/train.json)", ["Key", "Value"], rows, name="train"))
    if not curves_csv.is_file():
        section.blocks.append(missing("Training curves", str(curves_csv), "train"))
        return section
    table = pd.read_csv(curves_csv)
    if table.empty:
        section.blocks.append(Text(f"{curves_csv} has no rows (no optimiser step was logged).", kind="note"))
        return section
    section.blocks.append(Figure(f"Training curves ({curves_csv})", curves_figure(table), "train_curves.png"))
    return section
