"""VISOR scores of one model from its detection shards (stage ``visor@<model>``; SPEC §3.6): each image's
outcome (:func:`pipeline.visor.image_outcome`) as a table, then OA, OA(A), OA(B), VISOR_cond, VISOR_uncond
and VISOR_1..J over it. The table is also what stage ``compare`` resamples (``artifacts/visor_images``).

Kept apart from :mod:`pipeline.visor` (prompts, settings, the per-image verdict), which ``sample_grid`` also
reads, so an edit here reruns only the visor stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from pipeline.config import InputDataError
from pipeline.store.shards import STATUS_OK
from pipeline.visor import SpatialPrompt, VisorCfg, image_outcome

IMAGE_COLUMNS = ["prompt_id", "image_index", "scored", "found_a", "found_b", "right"]


def image_outcomes(records: Iterable[Mapping[str, Any]], prompts: Sequence[SpatialPrompt], threshold: float,
                   images_per_prompt: int) -> pd.DataFrame:
    """One row per detected image, sorted by (``prompt_id``, ``image_index``): ``scored`` (1, or 0 for a row
    not ``ok``), ``found_a``, ``found_b`` and ``right`` (0/1; 0 when not scored).

    Args:
        records: rows with ``prompt_id``, ``image_index``, ``status``, ``box_scores``, ``box_labels``,
            ``box_centers``.
        prompts: the expected prompts; images_per_prompt: J, the expected images of each.
    Raises:
        InputDataError: a row of a prompt or image index that is not expected (other params).
    """
    relation = {p.prompt_id: p.relation for p in prompts}
    outcomes: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for rec in records:
        key = (int(rec["prompt_id"]), int(rec["image_index"]))
        if key[0] not in relation or not 0 <= key[1] < images_per_prompt:
            raise InputDataError(f"detection row prompt {key[0]} image {key[1]} is not among the expected prompts "
                                 f"and {images_per_prompt} images each; the detections were made with other params; "
                                 f"rerun `dvc repro`")
        if rec["status"] != STATUS_OK:
            outcomes[key] = (0, 0, 0, 0)
            continue
        found = image_outcome(relation[key[0]], rec["box_scores"], rec["box_labels"], rec["box_centers"], threshold)
        outcomes[key] = (1, *(int(flag) for flag in found))
    rows = [(*key, *value) for key, value in sorted(outcomes.items())]
    return pd.DataFrame(rows, columns=IMAGE_COLUMNS).astype(int)


def scores_of_outcomes(table: pd.DataFrame, prompts: int, images_per_prompt: int) -> dict[str, float]:
    """OA, OA(A), OA(B), VISOR_cond, VISOR_uncond and VISOR_1..J, in percent, of an :func:`image_outcomes`
    table; images not scored are left out of every denominator.

    Args:
        prompts: the number of expected prompts; images_per_prompt: J.
    Returns:
        ``oa``, ``oa_a``, ``oa_b``, ``visor_cond``, ``visor_uncond``, ``visor_1`` ... ``visor_J``
        (NaN where a denominator is 0), ``images_expected``, ``images_scored``, ``images_failed``,
        ``images_missing``.
    """
    scored = table[table["scored"] == 1]
    found_a, found_b, right = (scored[c].to_numpy(bool) for c in ("found_a", "found_b", "right"))
    both = found_a & found_b

    def pct(num: int, den: int) -> float:
        return float(100.0 * num / den) if den else float("nan")

    n = len(scored)
    scores = {"oa": pct(both.sum(), n), "oa_a": pct(found_a.sum(), n), "oa_b": pct(found_b.sum(), n),
              "visor_cond": pct(right.sum(), both.sum()), "visor_uncond": pct(right.sum(), n)}
    counts = scored.groupby("prompt_id")["right"].sum().to_numpy()  # prompts with at least one scored image
    for k in range(1, images_per_prompt + 1):
        scores[f"visor_{k}"] = pct(int((counts >= k).sum()), len(counts))
    expected = prompts * images_per_prompt
    scores.update(images_expected=expected, images_scored=n, images_failed=len(table) - n,
                  images_missing=expected - len(table))
    return scores


def visor_scores(records: Iterable[Mapping[str, Any]], prompts: Sequence[SpatialPrompt], threshold: float,
                 images_per_prompt: int) -> dict[str, float]:
    """:func:`scores_of_outcomes` of the :func:`image_outcomes` of detection rows (see both)."""
    return scores_of_outcomes(image_outcomes(records, prompts, threshold, images_per_prompt), len(prompts),
                              images_per_prompt)


DETECTION_COLUMNS = ["prompt_id", "image_index", "status", "box_scores", "box_labels", "box_centers"]


def detection_outcomes(detections_dir: Path, prompts: Sequence[SpatialPrompt], cfg: VisorCfg) -> pd.DataFrame:
    """:func:`image_outcomes` of the detection shards in ``detections_dir`` (read column by column)."""
    from pipeline.store.shards import iter_rows

    return image_outcomes(iter_rows(detections_dir, columns=DETECTION_COLUMNS), prompts, cfg.threshold,
                          cfg.images_per_prompt)
