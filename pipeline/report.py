"""The results page: this run's numbers beside the published ones, figures, and what each number means.

A report is a list of :class:`Section` objects holding :class:`Table`, :class:`Figure` and :class:`Text`
blocks. :func:`write_report` renders the same sections twice: ``index.html``, one self-contained page
(images inlined as base64 data URIs, inline CSS, no external asset), and ``README.md``, its Markdown twin
(images written beside it under ``figures/``).

Builders (:func:`multigen_section`, :func:`piebench_section`, ...) read the metrics files the evaluation
stages write; where a file is missing the section says which file and which stage produces it, so a
partial pipeline still gives a readable page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import pandas as pd
import yaml
from PIL import Image

from pipeline.attention import GROUP_ORDER
from pipeline.datasets.piebench_files import EDITING_TYPES
from pipeline.config import InputDataError, MissingInputError
from pipeline.figures import curves_figure, grouped_bars
from pipeline.multigen import MG_LEVELS
from pipeline.piebench import TABLE as PIE_TABLE
from pipeline.store.codecs import image_from_bytes

log = logging.getLogger(__name__)

REPORTED_MG_LEVELS = (2, 3, 4, 5)  # the levels the TokenCompose README and the study report
MG_SETS = {"coco": "COCO", "ade20k": "ADE20K"}
# PIE-Bench columns in SPEC §5.6 order: raw metric -> header; keys are the table-scaled names of
# metrics/piebench/<backbone>.json (pipeline.piebench.TABLE), which data/published.yaml uses too.
PIE_HEADERS = {
    "structure_distance": "Structure ×10³ ↓",
    "psnr_unedit_part": "PSNR ↑",
    "lpips_unedit_part": "LPIPS ×10³ ↓",
    "mse_unedit_part": "MSE ×10⁴ ↓",
    "ssim_unedit_part": "SSIM ×10² ↑",
    "clip_similarity_target_image": "CLIP Whole ↑",
    "clip_similarity_target_image_edit_part": "CLIP Edited ↑",
}
PIE_COLUMNS = tuple((PIE_TABLE[metric][0], header) for metric, header in PIE_HEADERS.items())


@dataclass(frozen=True)
class Table:
    """A table: ``columns`` headers and ``rows`` of already formatted cells."""

    caption: str
    columns: list[str]
    rows: list[list[str]]
    name: str = ""


@dataclass(frozen=True)
class Figure:
    """A PNG figure; ``name`` is its file name in the Markdown twin's ``figures/`` folder."""

    caption: str
    png: bytes
    name: str


@dataclass(frozen=True)
class Text:
    """A paragraph; ``kind`` "note" (a caveat) and "missing" (an absent input) render as highlighted boxes."""

    text: str
    kind: str = "p"


Block = Union[Table, Figure, Text]


@dataclass
class Section:
    """A titled part of the page."""

    title: str
    blocks: list[Block] = field(default_factory=list)


# --- inputs ----------------------------------------------------------------------------------------

def load_published(path: str | Path) -> dict[str, Any]:
    """``data/published.yaml`` with its parts (``multigen``, ``visor``, ``piebench``, ``study``) checked."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: published numbers not found; set report.published in params.yaml to "
                                f"the project's data/published.yaml (or a copy in its layout)")
    data = yaml.safe_load(path.read_text())
    for part in ("multigen", "visor", "piebench", "study"):
        if not isinstance(data, dict) or part not in data:
            raise InputDataError(f"{path}: missing '{part}'; see the file's header for its layout")
    for part in ("multigen", "visor", "piebench"):
        if not data[part].get("rows") or not data[part].get("source"):
            raise InputDataError(f"{path}: '{part}' needs 'source' and 'rows'")
    if not isinstance(data["study"], dict) or not data["study"].get("note"):
        raise InputDataError(f"{path}: 'study' needs a 'note'")
    return data


def read_metrics(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``{stem: contents}`` of every ``*.json`` in ``directory`` (empty when the folder is absent)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def source_label(source: Mapping[str, str]) -> str:
    """The short label of published rows in a table's Source column: ``published (<repository>)``."""
    return f"published ({source['repository']})"


def citation(source: Mapping[str, str]) -> Text:
    """The full citation of a table's published rows: repository, file and commit."""
    return Text(f"Published rows: {source['repository']}, file {source['file']}, commit {source['commit']}.")


# --- formatting ------------------------------------------------------------------------------------

def fmt(value: Any, std: Any = None, decimals: int = 2) -> str:
    """``12.34`` or ``12.34(0.56)`` as MultiGen prints it; "—" for a missing or non-finite value."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    text = f"{value:.{decimals}f}"
    if isinstance(std, (int, float)) and not isinstance(std, bool) and math.isfinite(std):
        text += f"({std:.{decimals}f})"
    return text


def provenance_table(caption: str, metrics: Mapping[str, Mapping[str, Any]], shown: Iterable[str]) -> Table:
    """What each model's numbers were computed over: every metrics key not shown in the results table."""
    shown = set(shown)
    rows = []
    for model, values in metrics.items():
        extra = {k: v for k, v in sorted(values.items()) if k not in shown and not isinstance(v, (dict, list))}
        rows.append([model, "; ".join(f"{k} = {v}" for k, v in extra.items()) or "—"])
    return Table(caption, ["Model", "Computed over"], rows)


def missing(what: str, path: str, stage: str) -> Text:
    """The note shown where an input of the report does not exist yet."""
    return Text(f"{what}: not available — {path} is absent (produced by stage `{stage}`; run "
                f"`dvc repro {stage}`).", kind="missing")


# --- sections --------------------------------------------------------------------------------------

def multigen_section(metrics: Mapping[str, Mapping[str, Any]], published: Mapping[str, Any],
                     profile: str, decimals: int = 2) -> Section:
    """MultiGen MG2–MG5 per prompt set: this run's models, then the published rows (SPEC §3.7)."""
    section = Section("MultiGen (TokenCompose Table / study Table 1)")
    section.blocks += [Text(published["note"]), citation(published["source"])]
    if not metrics:
        section.blocks.append(missing("MultiGen scores", "metrics/multigen/<model>.json", "score"))
    source = source_label(published["source"])
    shown: set[str] = set()
    for key, label in MG_SETS.items():
        columns = ["Model", "Source"] + [f"MG{k}" for k in REPORTED_MG_LEVELS]
        rows = []
        for model, values in metrics.items():
            cells = [fmt(values.get(f"{key}_mg{k}"), values.get(f"{key}_mg{k}_std"), decimals)
                     for k in REPORTED_MG_LEVELS]
            shown |= {f"{key}_mg{k}{s}" for k in MG_LEVELS for s in ("", "_std")}
            rows.append([model, f"this run ({profile})", *cells])
        for row in published["rows"]:
            cells = [fmt(row[f"{key}_mg{k}"], row[f"{key}_mg{k}_std"], decimals) for k in REPORTED_MG_LEVELS]
            rows.append([row["method"], source, *cells])
        section.blocks.append(Table(f"MultiGen {label}: mean(std) over image index, %", columns, rows,
                                    name=f"multigen_{key}"))
    section.blocks.append(published_only_table(published, decimals))
    if metrics:
        section.blocks.append(Figure("MultiGen MG2–MG5 per model, mean over image index with its std as error "
                                     "bars; published rows hatched", multigen_chart(metrics, published, profile),
                                     "multigen_chart.png"))
        section.blocks.append(provenance_table("MultiGen: what each row of this run was computed over",
                                               metrics, shown))
    return section


PUBLISHED_ONLY = (("fid_coco", "FID (COCO) ↓"), ("fid_flickr30k", "FID (Flickr30K) ↓"),
                  ("latency_s", "Latency, s ↓"))


def published_only_table(published: Mapping[str, Any], decimals: int = 2) -> Table:
    """The TokenCompose README's photorealism and efficiency columns, which this pipeline does not compute."""
    rows = [[r["method"], *[fmt(r.get(key), r.get(f"{key}_std"), decimals) for key, _ in PUBLISHED_ONLY]]
            for r in published["rows"]]
    caption = ("Photorealism and efficiency, published only: this pipeline computes neither FID (it needs the "
               "COCO and Flickr30K reference images and an Inception network) nor a latency comparable with the "
               "original's GPU; — where the README prints none")
    return Table(caption, ["Method", *[h for _, h in PUBLISHED_ONLY]], rows, name="multigen_published_only")


def _number(value: Any) -> float:
    """``value`` as a float; NaN for a missing or non-numeric value (a bar chart leaves it out)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def multigen_chart(metrics: Mapping[str, Mapping[str, Any]], published: Mapping[str, Any], profile: str) -> bytes:
    """Bars of MG2–MG5 per prompt set: this run's models, then the published rows (hatched)."""
    def series(values: Mapping[str, Any], key: str) -> tuple[list[float], list[float]]:
        return ([_number(values.get(f"{key}_mg{k}")) for k in REPORTED_MG_LEVELS],
                [_number(values.get(f"{key}_mg{k}_std")) for k in REPORTED_MG_LEVELS])

    panels, hatched = {}, set()
    for key, label in MG_SETS.items():
        panel = {f"{model} ({profile})": series(values, key) for model, values in metrics.items()}
        for row in published["rows"]:
            panel[f"{row['method']} (published)"] = series(row, key)
            hatched.add(f"{row['method']} (published)")
        panels[f"MultiGen {label}"] = panel
    return grouped_bars(panels, [f"MG{k}" for k in REPORTED_MG_LEVELS], hatched, ylabel="%", per_row=1)


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
        section.blocks.append(provenance_table("VISOR: what each row of this run was computed over", metrics,
                                               {key for key, _ in columns}))
    return section


def piebench_section(metrics: Mapping[str, Mapping[str, Any]], published: Mapping[str, Any],
                     profile: str, decimals: int = 2) -> Section:
    """PIE-Bench metrics per editing backbone beside the published rows (SPEC §5.6–5.7)."""
    section = Section("PIE-Bench editing (Blended Latent Diffusion; study Table 2)")
    section.blocks += [Text(published["note"]), citation(published["source"])]
    if not metrics:
        section.blocks.append(missing("PIE-Bench metrics", "metrics/piebench/<backbone>.json", "piebench"))
    columns = ["Method", "Source"] + [header for _, header in PIE_COLUMNS]
    rows = [[f"BLD, {backbone} backbone", f"this run ({profile})",
             *[fmt(values.get(key), decimals=decimals) for key, _ in PIE_COLUMNS]]
            for backbone, values in metrics.items()]
    source = source_label(published["source"])
    for row in published["rows"]:
        name = f"{row['inversion']} + {row['editing']}"
        extras = [x for x in (row.get("base"), row.get("note")) if x]
        if extras:
            name += f" ({'; '.join(extras)})"
        rows.append([name, source, *[fmt(row[key], decimals=decimals) for key, _ in PIE_COLUMNS]])
    section.blocks.append(Table("PIE-Bench: means over edited images", columns, rows, name="piebench"))
    if metrics:
        overall = {b: {k: v for k, v in m.items() if not k.startswith("type_") and not k.endswith(".n")}
                   for b, m in metrics.items()}  # per-editing-type means: in the chart below and the metrics file
        section.blocks.append(provenance_table("PIE-Bench: what each row of this run was computed over",
                                               overall, [key for key, _ in PIE_COLUMNS]))
    chart = piebench_type_chart(metrics)
    if chart is not None:
        section.blocks.append(Figure("PIE-Bench per editing type: each column's mean over the scored edits of "
                                     "that type, per backbone (types without a scored edit left out; counts as "
                                     "type_<id>.scored in metrics/piebench/<backbone>.json)", chart,
                                     "piebench_types.png"))
    return section


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
    section.blocks.append(provenance_table("Grounding: what each row was computed over", metrics, keys))
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


def study_section(study: Mapping[str, Any]) -> Section:
    """What ``data/published.yaml`` says of the follow-up study's own tables (``study.note``)."""
    return Section("Study tables", [Text(study["note"], kind="note")])


def profile_banner(profile: str) -> str:
    """The line at the top of the page that says how far the numbers can be trusted."""
    if profile == "demo":
        return ("Profile demo: tiny embedded models with random weights and synthetic data. The numbers on "
                "this page are meaningless; they only show that every code path of the pipeline runs.")
    return (f"Profile {profile}: numbers computed with the model references and data listed under each "
            "table; compare with the published rows only where the settings match.")


def figures_section(title: str, paths: Sequence[Path], intro: str, missing_note: Text | None = None) -> Section:
    """A section of PNG files, each shown with its file path as caption."""
    section = Section(title, [Text(intro)])
    if not paths and missing_note is not None:
        section.blocks.append(missing_note)
    for path in paths:
        section.blocks.append(Figure(str(path), Path(path).read_bytes(), _figure_name(path)))
    return section


def _prompt_then_model(path: Path) -> tuple[int, str, str]:
    """Sort key of ``plots/attention/<model>_<i>.png``: prompt ``i`` first, so each prompt's figures of the
    different models sit next to each other; other names last, by name."""
    model, _, index = path.stem.rpartition("_")
    return (int(index), model, path.name) if index.isdigit() and model else (1 << 30, path.stem, path.name)


def _figure_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(Path(path).parts[-2:]))


def build_sections(root: str | Path, published: Mapping[str, Any], profile: str, decimals: int = 2) -> list[Section]:
    """Every section of the page, read from the pipeline's outputs under ``root`` (the repository)."""
    root = Path(root)
    train = root / "metrics" / "train.json"
    edits = sorted((root / "plots").glob("edits_*.png"))
    attention = sorted((root / "plots" / "attention").glob("*.png"), key=_prompt_then_model)
    samples = sorted((root / "plots" / "samples").glob("*.png"))
    return [
        multigen_section(read_metrics(root / "metrics" / "multigen"), published["multigen"], profile, decimals),
        figures_section("Generated images side by side", samples,
                        "One image (sample_grid.image_index) of each of the first prompts of each MultiGen set and "
                        "of the SR2D spatial prompts, one row per model: every row starts from the same noise, so "
                        "rows differ only by the model. Under each image, the detector's verdict: for MultiGen, how "
                        "many of the prompt's objects were found above the threshold and which were missed; for "
                        "SR2D, which objects were found and whether the relation holds (plots/samples/<set>.png).",
                        missing("Sample grids", "plots/samples/<set>.png", "sample_grid")),
        categories_section(read_category_tables(root / "plots" / "multigen_categories")),
        visor_section(read_metrics(root / "metrics" / "visor"), published["visor"], published["multigen"], profile,
                      decimals),
        piebench_section(read_metrics(root / "metrics" / "piebench"), published["piebench"], profile, decimals),
        study_section(published["study"]),
        figures_section("Edit panels", edits, "Blended Latent Diffusion edits per backbone "
                        "(plots/edits_<backbone>.png: source, mask, edit).",
                        missing("Edit panels", "plots/edits_<backbone>.png", "piebench")),
        training_section(json.loads(train.read_text()) if train.is_file() else None,
                         root / "plots" / "train_curves.csv"),
        figures_section("Cross-attention maps", attention,
                        "Per-token cross-attention (averaged over heads and the layers of each resolution group, "
                        "upsampled to the image) at chosen denoising steps, base and trained model with the same "
                        "seed; one row per word token, one column per step (study Figures 3, 4, 8).",
                        missing("Attention figures", "plots/attention/<model>_<i>.png", "attention_maps")),
        grounding_section(read_metrics(root / "metrics" / "grounding")),
    ]


# --- rendering -------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th:first-child,th:nth-child(2),td:first-child,td:nth-child(2){text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
.note{background:#fff4d6;border-left:4px solid #e0a800;padding:.5em 1em}
.banner{background:#ffe0e0;border-left:4px solid #c00;padding:.6em 1em;font-weight:600}
nav ol{columns:2;font-size:.9em;margin:0 0 1.5em}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
"""

# Marks every image the browser decoded, so a headless check of the DOM can tell broken images apart.
DECODE_CHECK = ("window.addEventListener('load',()=>{for(const i of document.images)"
                "{i.dataset.decoded=(i.complete&&i.naturalWidth>0)?'1':'0';}});")


EMBED_PNG_LIMIT = 1 << 20  # bytes; a larger figure goes into the page as JPEG (its PNG stays in figures/)
EMBED_MAX_WIDTH = 1600     # pixels of such a JPEG


def embedded_image(png: bytes, limit: int = EMBED_PNG_LIMIT, max_width: int = EMBED_MAX_WIDTH) -> tuple[str, bytes]:
    """(MIME type, bytes) to inline for a figure: the PNG itself when small, else a JPEG (quality 85) at
    most ``max_width`` wide, so a page of many attention grids stays a few MB."""
    if len(png) <= limit:
        return "image/png", png
    image = image_from_bytes(png)
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "image/jpeg", buf.getvalue()


def render_html(title: str, sections: Sequence[Section], banner: str = "") -> str:
    """One self-contained HTML page: inline CSS, images as ``data:image/png;base64`` URIs, a list of the
    sections linked to them at the top."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
           f"<style>{CSS}</style>", f"<script>{DECODE_CHECK}</script>", "</head><body>", f"<h1>{esc(title)}</h1>"]
    if banner:
        out.append(f'<p class="banner" id="profile-banner">{esc(banner)}</p>')
    links = "".join(f'<li><a href="#s{i}">{esc(section.title)}</a></li>' for i, section in enumerate(sections))
    out.append(f'<nav id="contents"><ol>{links}</ol></nav>')
    for i, section in enumerate(sections):
        out.append(f'<section id="s{i}"><h2>{esc(section.title)}</h2>')
        for block in section.blocks:
            out.append(_html_block(block))
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_block(block: Block) -> str:
    esc = html.escape
    if isinstance(block, Text):
        cls = f' class="note {block.kind}"' if block.kind in ("note", "missing") else ""
        return f"<p{cls}>{esc(block.text)}</p>"
    if isinstance(block, Figure):
        mime, payload = embedded_image(block.png)
        data = base64.b64encode(payload).decode("ascii")
        return (f'<figure><img alt="{esc(block.caption)}" src="data:{mime};base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>")
    ident = f' id="{esc(block.name)}"' if block.name else ""
    head = "".join(f"<th>{esc(c)}</th>" for c in block.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
    return (f"<table{ident}><caption>{esc(block.caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def render_markdown(title: str, sections: Sequence[Section], banner: str = "", figures_dir: str = "figures") -> str:
    """The Markdown twin of :func:`render_html`; figures are linked as ``figures/<name>``."""
    out = [f"# {title}", ""]
    if banner:
        out += [f"> **{banner}**", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            out += _md_block(block, figures_dir) + [""]
    return "\n".join(out).rstrip() + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block, figures_dir: str) -> list[str]:
    if isinstance(block, Text):
        return [f"> {block.text}"] if block.kind in ("note", "missing") else [block.text]
    if isinstance(block, Figure):
        return [f"![{_md_cell(block.caption)}]({figures_dir}/{block.name})", f"*{block.caption}*"]
    lines = [f"**{block.caption}**", "", "| " + " | ".join(map(_md_cell, block.columns)) + " |",
             "|" + "---|" * len(block.columns)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
    return lines


def write_report(out_dir: str | Path, title: str, sections: Sequence[Section], banner: str = "") -> dict[str, int]:
    """Write ``index.html``, ``README.md`` and ``figures/*.png`` into ``out_dir``; return block counts."""
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for stale in figures.glob("*.png"):
        stale.unlink()
    blocks = [b for s in sections for b in s.blocks]
    for fig in (b for b in blocks if isinstance(b, Figure)):
        (figures / fig.name).write_bytes(fig.png)
    (out_dir / "index.html").write_text(render_html(title, sections, banner), encoding="utf-8")
    (out_dir / "README.md").write_text(render_markdown(title, sections, banner), encoding="utf-8")
    counts = {"sections": len(sections), "tables": sum(isinstance(b, Table) for b in blocks),
              "figures": sum(isinstance(b, Figure) for b in blocks),
              "missing_inputs": sum(isinstance(b, Text) and b.kind == "missing" for b in blocks)}
    log.info("report written to %s: %s", out_dir, counts)
    return counts
