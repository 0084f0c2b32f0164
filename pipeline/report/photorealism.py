"""The report's photorealism and cost section: FID, CLIP score and latency of this run beside the published
columns of the TokenCompose README (FID on COCO and Flickr30K, seconds per image)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from pipeline.figures import _png, plt
from pipeline.report.blocks import Figure, Section, Table, Text, fmt, missing, provenance_table
from pipeline.report.published import citation, source_label

DEFAULT_SETS = ("coco", "flickr30k")
SET_LABELS = {"coco": "COCO", "flickr30k": "Flickr30K"}
TRADE_OFF_LEVEL = 3  # MG3: the first level where SD1.4 and TokenCompose clearly differ (SPEC §3.7)


def reference_sets(fid: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The reference sets of this run's FID metrics (sets are the dict entries with a ``fid``), COCO and
    Flickr30K first; the published two when there are no metrics."""
    found = {k for values in fid.values() for k, v in values.items() if isinstance(v, dict) and "fid" in v}
    return [s for s in DEFAULT_SETS if s in found or not found] + sorted(found - set(DEFAULT_SETS))


def _run_row(model: str, fid: Mapping[str, Any], latency: Mapping[str, Any], sets: list[str], profile: str,
             decimals: int) -> list[str]:
    """One row of this run: FID and CLIP score per set, then seconds per image in both timed settings."""
    fids = [fmt(fid.get(s, {}).get("fid"), decimals=decimals) for s in sets]
    clips = [fmt(fid.get(s, {}).get("clip_score"), fid.get(s, {}).get("clip_score_std"), decimals) for s in sets]
    times = [fmt(latency.get(k, {}).get("seconds_per_image"), latency.get(k, {}).get("seconds_per_image_std"),
                 decimals) for k in ("original", "pipeline")]
    return [model, f"this run ({profile})", *fids, *clips, *times]


def _published_row(row: Mapping[str, Any], label: str, sets: list[str], decimals: int) -> list[str]:
    """A README row: its FID per set ("—" where it prints none), no CLIP score, its latency (mean(std))."""
    fids = [fmt(row.get(f"fid_{s}"), decimals=decimals) for s in sets]
    latency = fmt(row.get("latency_s"), row.get("latency_s_std"), decimals)
    return [row["method"], label, *fids, *["—"] * len(sets), latency, "—"]


def settings_of(fid: Mapping[str, Any], latency: Mapping[str, Any], sets: list[str]) -> dict[str, Any]:
    """The flat settings a model's photorealism numbers were computed over (for the provenance table)."""
    out: dict[str, Any] = {"extractor": fid.get("extractor"), "clip_model": fid.get("clip_model"),
                           "sampling steps": fid.get("sampler", {}).get("steps"),
                           "image size": fid.get("sampler", {}).get("size"),
                           "latency hardware": latency.get("hardware")}
    for s in sets:
        out[f"{s} images / real images"] = f"{fid.get(s, {}).get('images')} / {fid.get(s, {}).get('real_images')}"
    for k in ("original", "pipeline"):
        timed = latency.get(k, {})
        out[f"latency {k} setting"] = (f"{timed.get('num_inference_steps')} steps, batch {timed.get('batch_size')}, "
                                       f"{timed.get('dtype')}, {timed.get('images')} images") if timed else None
    return {k: v for k, v in out.items() if v is not None}


def trade_off_chart(fid: Mapping[str, Mapping[str, Any]], multigen: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """FID (COCO) against MultiGen COCO MG3, one labelled point per model with both; None when fewer than 2."""
    points = {m: (multigen[m].get(f"coco_mg{TRADE_OFF_LEVEL}"), v.get("coco", {}).get("fid"))
              for m, v in fid.items() if m in multigen}
    points = {m: p for m, p in points.items() if all(isinstance(x, (int, float)) and math.isfinite(x) for x in p)}
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for model, (x, y) in points.items():
        ax.scatter([x], [y], s=18)
        ax.annotate(model, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"MultiGen COCO MG{TRADE_OFF_LEVEL}, % (higher: better grounding)", fontsize=8)
    ax.set_ylabel("FID (COCO) (lower: more realistic)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def photorealism_section(fid: Mapping[str, Mapping[str, Any]], latency: Mapping[str, Mapping[str, Any]],
                         multigen: Mapping[str, Mapping[str, Any]], published: Mapping[str, Any], profile: str,
                         decimals: int = 2) -> Section:
    """FID and CLIP score per reference set and seconds per image of each model (metrics/fid, metrics/latency),
    then the README's rows (``published``: the ``multigen`` part, whose rows carry the FID and latency
    columns), the settings behind each of this run's rows, and FID against MG3 as a chart."""
    section = Section("Photorealism and cost (TokenCompose Table: FID, latency)")
    sets = reference_sets(fid)
    section.blocks += [Text(
        "FID: one image per caption of each reference set against its real images (docs/fid.md: COCO val2017, "
        "10,000 captions, 5,000 images; Flickr30K Entities val, 1,000 images), lower is better. CLIP score: "
        "max(100·cos, 0) of each image against its caption, mean(std) over images. Latency: seconds per image, "
        "mean(std) over timed calls, in the published column's setting (50 steps, one image per call, fp32) and "
        "in this pipeline's sampling settings."), citation(published["source"])]
    hardware = sorted({v.get("hardware") for v in latency.values() if v.get("hardware")})
    if hardware:
        section.blocks.append(Text(
            f"This run's latencies were measured on {'; '.join(hardware)}; they compare with the published 7.5 s "
            "only on the same hardware, which the README does not name.", kind="note"))
    if any(v.get("extractor") == "tiny-conv-fid" for v in fid.values()):
        section.blocks.append(Text("FIDs of this run come from the embedded tiny feature extractor over a few "
                                   "drawn images: they exercise the code path and mean nothing as numbers.",
                                   kind="note"))
    if fid:
        section.blocks.append(Text(
            "FID differences carry no interval here (docs/comparisons.md: a paired bootstrap would refit both "
            "Gaussians per replicate). FID implementations alone differ by more than the published 0.3–0.7 gap "
            "(docs/fid.md §1), so "
            "compare FIDs within this run only; the CLIP-score differences have paired intervals "
            "(Differences between models).", kind="note"))
    else:
        section.blocks.append(missing("FID and CLIP score", "metrics/fid/<model>.json", "fid"))
    if not latency:
        section.blocks.append(missing("Latency", "metrics/latency/<model>.json", "latency"))
    columns = (["Model", "Source"] + [f"FID ({SET_LABELS.get(s, s)}) ↓" for s in sets]
               + [f"CLIP score ({SET_LABELS.get(s, s)}) ↑" for s in sets]
               + ["Latency, s ↓ (50 steps, batch 1)", "Latency, s (pipeline settings)"])
    models = sorted(set(fid) | set(latency))
    rows = [_run_row(m, fid.get(m, {}), latency.get(m, {}), sets, profile, decimals) for m in models]
    label = source_label(published["source"])
    rows += [_published_row(r, label, sets, decimals) for r in published["rows"]]
    section.blocks.append(Table("Photorealism and cost; — where the README prints none (checkpoints step_<N> "
                                "are not timed: they have the architecture of trained)", columns, rows,
                                name="photorealism"))
    if models:
        section.blocks.extend(provenance_table(
            "Photorealism: what each row of this run was computed over",
            {m: settings_of(fid.get(m, {}), latency.get(m, {}), sets) for m in models}, ()))
    chart = trade_off_chart(fid, multigen)
    if chart is not None:
        section.blocks.append(Figure(f"Image quality against grounding: FID (COCO) and MultiGen COCO "
                                     f"MG{TRADE_OFF_LEVEL} of each model of this run", chart, "fid_vs_mg.png"))
    return section
