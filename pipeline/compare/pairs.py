"""Every pair of models compared on the same units, with paired-bootstrap intervals (:mod:`.bootstrap`).

MultiGen: the units are the prompts of a set (each with its ``J`` seeded images, the same seeds for every
model); ``MG_k`` of a model on a resample is ``100 x images with >= k objects found / images scored``, so the
full-sample value is the MG_k of the score stage. PIE-Bench: the units are the images; a metric is the mean
of the model's finite values times the table scale, as in the PIE-Bench table. CLIP score: the units are the
captions of an FID reference set (one seeded image each, the same noise for every model); the score is the
mean over the captions whose image was scored, as in ``metrics/fid``. One resampling draw per unit set serves
every model and pair (common random numbers), from ``compare.seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.compare.bootstrap import (Interval, holm, percentile_interval, ratio, replicate_ratios,
                                        resample_weights)
from pipeline.config import InputDataError
from pipeline.names import MG_LEVELS


@dataclass(frozen=True)
class CompareCfg:
    """Params section ``compare`` (stage compare -> metrics/compare.json)."""

    reps: int = 2000          # bootstrap replicates
    level: float = 0.95       # interval coverage
    seed: int = 0             # seed of the resampling draws


Units = dict[str, tuple[np.ndarray, np.ndarray]]  # model -> ((n,) num, (n,) den) on shared units


def on_one_grid(tables: Mapping[str, pd.DataFrame], what: str) -> dict[str, pd.DataFrame]:
    """Each model's rows sorted by (``prompt_id``, ``image_index``), after checking that every model lists the
    same pairs (an :class:`~pipeline.config.InputDataError` naming ``what`` and both models otherwise)."""
    out, grid = {}, None
    for model, table in tables.items():
        rows = table.sort_values(["prompt_id", "image_index"])
        keys = rows[["prompt_id", "image_index"]].to_numpy()
        if grid is None:
            grid, first = keys, model
        elif not np.array_equal(keys, grid):
            raise InputDataError(f"{model} and {first} were scored on different {what} or images (other sampling "
                                 f"params); rerun `dvc repro` so every model has the same grid")
        out[model] = rows
    return out


def multigen_units(tables: Mapping[str, pd.DataFrame], prompt_set: str, level: int) -> Units:
    """Per-prompt ``(num, den)`` of ``MG_level`` for each model: ``num`` = 100 x scored images of the prompt
    with at least ``level`` objects found, ``den`` = scored images of the prompt.

    Args:
        tables: model -> its ``artifacts/multigen_images/<model>.csv`` (``prompt_set``, ``prompt_id``,
            ``image_index``, ``found``, ``scored``).
    Raises:
        InputDataError: when models were scored on different (prompt, image) grids (other sampling params).
    """
    units = {}
    sets = {model: table[table["prompt_set"] == prompt_set] for model, table in tables.items()}
    for model, rows in on_one_grid(sets, f"{prompt_set} prompts").items():
        hit = 100.0 * ((rows["found"] >= level) & (rows["scored"] == 1))
        by_prompt = pd.DataFrame({"prompt": rows["prompt_id"], "hit": hit, "scored": rows["scored"]})
        sums = by_prompt.groupby("prompt", sort=True).sum()
        units[model] = (sums["hit"].to_numpy(np.float64), sums["scored"].to_numpy(np.float64))
    return units


# VISOR score -> (numerator, denominator) per-image column summed over a prompt's images
VISOR_FRACTIONS = {"oa": ("both", "scored"), "oa_a": ("a", "scored"), "oa_b": ("b", "scored"),
                   "visor_uncond": ("right", "scored"), "visor_cond": ("right", "both")}  # in table order


def visor_units(tables: Mapping[str, pd.DataFrame], metric: str) -> Units:
    """Per-prompt ``(num, den)`` of one VISOR score for each model, from the images' outcomes: ``oa``,
    ``oa_a``, ``oa_b``, ``visor_uncond`` (100 x images with both objects / A / B found / spatially right, over
    scored images), ``visor_cond`` (100 x right over images with both found) and ``visor_<k>`` (100 x [at
    least k right images] over prompts with a scored image), so the full-sample values are the visor stage's.

    Args:
        tables: model -> its ``artifacts/visor_images/<model>.csv`` (``prompt_id``, ``image_index``,
            ``scored``, ``found_a``, ``found_b``, ``right``).
    Raises:
        InputDataError: when models were scored on different (prompt, image) grids (other sampling params).
    """
    units = {}
    for model, rows in on_one_grid(tables, "SR2D prompts").items():
        scored = rows["scored"].to_numpy(np.float64)
        a, b, right = (rows[c].to_numpy(np.float64) * scored for c in ("found_a", "found_b", "right"))
        sums = pd.DataFrame({"prompt": rows["prompt_id"].to_numpy(), "scored": scored, "a": a, "b": b,
                             "both": a * b, "right": right}).groupby("prompt", sort=True).sum()
        if metric in VISOR_FRACTIONS:
            num, den = VISOR_FRACTIONS[metric]
            units[model] = (100.0 * sums[num].to_numpy(), sums[den].to_numpy())
        elif metric.startswith("visor_") and metric.removeprefix("visor_").isdigit():
            has_image = (sums["scored"] > 0).to_numpy(np.float64)
            units[model] = (100.0 * (sums["right"].to_numpy() >= int(metric[6:])) * has_image, has_image)
        else:
            raise ValueError(f"unknown VISOR score {metric!r}")
    return units


def aligned_units(items: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], what: str) -> Units:
    """Per-unit ``(num, den)`` for each model from ``model -> (unit ids, values, ok)``: the value and 1 where
    the unit is ``ok`` with a finite value, else 0 and 0. Every model must list the same unit ids in the same
    order (an :class:`~pipeline.config.InputDataError` naming ``what`` and both models otherwise)."""
    units, ids = {}, None
    for model, (unit_ids, values, ok) in items.items():
        if ids is None:
            ids, first = unit_ids, model
        elif not np.array_equal(unit_ids, ids):
            raise InputDataError(f"{what}: {model} and {first} list different units; rerun `dvc repro` so every "
                                 f"model is evaluated on the same inputs")
        scored = np.asarray(ok, bool) & np.isfinite(values)
        units[model] = (np.where(scored, values, 0.0), scored.astype(np.float64))
    return units


def piebench_units(tables: Mapping[str, pd.DataFrame], metric: str, factor: float) -> Units:
    """Per-image ``(num, den)`` of one PIE-Bench metric for each model: the value x ``factor`` and 1 where the
    image was scored (``status`` ok) with a finite value, else 0 and 0.

    Args:
        tables: backbone -> its ``plots/piebench/<backbone>.csv`` (``image_id``, ``status``, raw metrics).
    Raises:
        InputDataError: when the backbones' tables list different images.
    """
    items = {}
    for model, table in tables.items():
        rows = table.sort_values("image_id")
        items[model] = (rows["image_id"].astype(str).to_numpy(), rows[metric].astype(float).to_numpy() * factor,
                        rows["status"].to_numpy() == "ok")
    return aligned_units(items, f"plots/piebench/<backbone>.csv ({metric})")


def clip_units(tables: Mapping[str, pd.DataFrame], reference: str) -> Units:
    """Per-caption ``(num, den)`` of the CLIP score on one FID reference set for each model: the score and 1
    where the caption's image was scored, else 0 and 0.

    Args:
        tables: model -> its ``plots/clip_score/<model>.csv`` (``reference``, ``prompt_id``, ``clip_score``).
    Raises:
        InputDataError: when the models were sampled from different captions.
    """
    items = {}
    for model, table in tables.items():
        rows = table[table["reference"] == reference].sort_values("prompt_id")
        values = rows["clip_score"].astype(float).to_numpy()
        items[model] = (rows["prompt_id"].to_numpy(), values, np.isfinite(values))
    return aligned_units(items, f"plots/clip_score/<model>.csv ({reference})")


def compare_units(units: Units, order: Sequence[str], cfg: CompareCfg) -> dict[str, dict[str, Any]]:
    """``{"<a>-<b>": interval fields}`` for every pair of ``order`` with ``a`` after ``b``: the difference
    ``score(a) - score(b)`` and its interval (:class:`Interval` as a dict with ``significant`` and the
    bootstrap ``p``), with ``p_holm`` and ``significant_holm`` (Holm's correction over the pairs of this one
    score, at familywise error ``1 - cfg.level``), plus ``{"<model>": {"value": ...}}`` for each model's own
    full-sample score."""
    n = len(next(iter(units.values()))[0]) if units else 0
    weights = resample_weights(n, cfg.reps, cfg.seed) if n else np.zeros((0, 0))
    values = {m: ratio(*units[m]) for m in order}
    reps = {m: replicate_ratios(weights, *units[m]) if n else np.zeros(0) for m in order}
    out: dict[str, dict[str, Any]] = {m: {"value": values[m]} for m in order}
    for i, b in enumerate(order):
        for a in order[i + 1:]:
            interval = percentile_interval(values[a] - values[b], reps[a] - reps[b], cfg.level, n)
            out[f"{a}-{b}"] = interval_fields(interval)
    pairs = [key for key in out if "diff" in out[key]]
    for key, adjusted in zip(pairs, holm([out[key]["p"] for key in pairs])):
        out[key].update(p_holm=adjusted, significant_holm=bool(adjusted < 1 - cfg.level))
    return out


def interval_fields(interval: Interval) -> dict[str, Any]:
    """An interval as JSON metrics: ``diff``, ``low``, ``high``, ``significant`` (and ``units``)."""
    fields = asdict(interval)
    fields.pop("level")
    return {**fields, "significant": interval.significant}


def compare_multigen(tables: Mapping[str, pd.DataFrame], order: Sequence[str], prompt_sets: Sequence[str],
                     cfg: CompareCfg) -> dict[str, Any]:
    """``{set: {"mg<k>": compare_units(...)}}`` for every prompt set and MG level."""
    return {name: {f"mg{k}": compare_units(multigen_units(tables, name, k), order, cfg) for k in MG_LEVELS}
            for name in prompt_sets}


def visor_metrics(images_per_prompt: int) -> list[str]:
    """The VISOR scores compared, in the order of the VISOR table: OA, OA(A), OA(B), VISOR_uncond,
    VISOR_cond, VISOR_1..J."""
    return [*VISOR_FRACTIONS, *(f"visor_{k}" for k in range(1, images_per_prompt + 1))]


def compare_visor(tables: Mapping[str, pd.DataFrame], order: Sequence[str], images_per_prompt: int,
                  cfg: CompareCfg) -> dict[str, Any]:
    """``{score: compare_units(...)}`` for every VISOR score (:func:`visor_metrics`), prompts resampled."""
    return {name: compare_units(visor_units(tables, name), order, cfg) for name in visor_metrics(images_per_prompt)}


def compare_piebench(tables: Mapping[str, pd.DataFrame], order: Sequence[str], keys: Mapping[str, tuple[str, float]],
                     cfg: CompareCfg) -> dict[str, Any]:
    """``{table name: compare_units(...)}`` for every PIE-Bench metric (``keys``: raw metric -> (table name,
    table scale), :data:`pipeline.names.PIEBENCH_KEYS`)."""
    return {name: compare_units(piebench_units(tables, metric, factor), order, cfg)
            for metric, (name, factor) in keys.items()}


def compare_clip(tables: Mapping[str, pd.DataFrame], order: Sequence[str], references: Sequence[str],
                 cfg: CompareCfg) -> dict[str, Any]:
    """``{reference set: compare_units(...)}`` of the CLIP score on every FID reference set."""
    return {name: compare_units(clip_units(tables, name), order, cfg) for name in references}
