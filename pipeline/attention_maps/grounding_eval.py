"""Stages ``grounding_eval@<model>``: the share of each category token's attention inside its Grounded-SAM mask
(the quantity TokenCompose's token loss drives towards 1, SPEC §1.4.2), on head- and layer-averaged maps."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.attention import check_group_names, mask_ratios
from pipeline.attention_maps.recording import ImageAttention, sample_with_attention, token_maps
from pipeline.config import NonEmpty, PositiveInt
from pipeline.masks.jobs import make_job
from pipeline.sampling.items import SampleItem
from pipeline.sampling.sampler import Sampler
from pipeline.store.codecs import image_from_bytes, rle_decode
from pipeline.store.shards import STATUS_OK, iter_rows
from pipeline.text.align import CaptionTokens, align_phrase, locate_phrases

log = logging.getLogger(__name__)


def grounding_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's attention mass inside its mask: (K, h, w), (K, H, W) → (K,) in [0, 1].

    share_k = Σ_p A_k(p)·m_k(p) / Σ_p A_k(p) — the ratio of TokenCompose's token loss
    (:func:`pipeline.attention.mask_ratios`), here on head- and layer-averaged word maps and with m_k the
    mask **area-averaged** onto the map's grid (the fraction of each attention cell the object covers)
    rather than the training loss's dilating bilinear-then-``> 0`` resize. This equals the share at image
    resolution with each attention cell spread evenly over its pixels. A map with no mass gives NaN.
    """
    if maps.ndim != 3 or masks.ndim != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(f"expected (K, h, w) maps and (K, H, W) masks, got {tuple(maps.shape)} and "
                         f"{tuple(masks.shape)}")
    k, h, w = maps.shape
    if masks.shape[-2] % h or masks.shape[-1] % w:
        log.warning("mask size %s is not a multiple of the map size %s; cells are averaged approximately",
                    tuple(masks.shape[-2:]), (h, w))
    cover = F.adaptive_avg_pool2d(masks.float().unsqueeze(1), (h, w)).reshape(1, k, h * w)
    cols = maps.float().reshape(1, 1, 1, k, h * w).transpose(-1, -2).unsqueeze(-1)  # (L, B, heads, P, W, S)
    return mask_ratios(cols, cover).reshape(k)


def image_shares(record: ImageAttention, groups: Sequence[str], token_lists: Sequence[Sequence[int]],
                 masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """group -> (K,) grounding shares of K words of one image, on its all-step mean maps; masks (K, H, W)."""
    return {g: grounding_share(token_maps(record.mean[g][None], token_lists)[0], masks) for g in groups}


@dataclass(frozen=True)
class GroundingEvalCfg:
    """Top-level ``grounding_eval``: the groups whose attention share is measured."""

    groups: Annotated[list[str], NonEmpty()]

    def __post_init__(self) -> None:
        check_group_names(self.groups)


@dataclass(frozen=True)
class GroundingEvalScale:
    """``profiles.<p>.grounding_eval``: how many MultiGen images are regenerated with capture."""

    prompt_sets: Annotated[list[str], NonEmpty()]
    num_prompts: PositiveInt  # the first prompts of each set (the sampler's prompt ids)
    images_per_prompt: PositiveInt  # image indices 0..J-1 (the sampler's seeds)


def category_tokens(tokenizer, prompt: str, objects: Sequence[str], caption_id: str = "?"):
    """Each object's CLIP token positions (all its sub-tokens, as TokenCompose supervises them).

    Uses :func:`pipeline.text.align.align_phrase` at the object's own character position in the prompt.
    Returns (indices, statuses, errors), one entry per object; ``[]`` indices where alignment failed.
    """
    tokens = CaptionTokens.of(tokenizer, prompt)
    aligned = [align_phrase(tokenizer, tokens, name, start, caption_id=caption_id)
               for name, start in zip(objects, locate_phrases(prompt, objects))]
    return [a.indices for a in aligned], [a.status for a in aligned], [a.error for a in aligned]


def grounding_rows(sampler: Sampler, grounder: Any, items: Sequence[SampleItem],
                   groups: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Regenerate MultiGen images with capture, segment their categories, measure attention shares.

    Args:
        sampler: :class:`pipeline.sampling.Sampler` of the model (plain SD).
        grounder: :class:`pipeline.masks.jobs.Grounder` (Grounded-SAM) run on the generated images.
        items: :class:`pipeline.sampling.SampleItem` list (``prompt_items``: the ``sample`` stage's keys,
            hence its seeds).
        groups: resolution groups to measure.

    Returns:
        (rows, samples): one row per (image, category) with ``image_id``, ``phrase``, ``token_indices``,
        ``status``/``error`` (Grounded-SAM's reason codes), ``mask_area`` and ``share_<group>`` (NaN unless
        ``status == "ok"``); and the sampler's rows of the regenerated images.
    """
    samples, records = sample_with_attention(sampler, items, groups)
    jobs, by_id = [], {}
    for item, sample, record in zip(items, samples, records):
        image_id = f"{item.promptset}/{item.prompt_id}_{item.image_index}"
        indices, status, errors = category_tokens(sampler.pipe.tokenizer, item.text, item.objects, image_id)
        nouns = dict(image_id=image_id, caption=item.text, phrases=list(item.objects), token_indices=indices,
                     phrase_status=status, phrase_error=errors)
        ok = sample["status"] == STATUS_OK
        jobs.append(make_job(nouns, image_from_bytes(sample["image"]) if ok else None,
                             STATUS_OK if ok else "missing_image", "" if ok else sample["error"]))
        by_id[image_id] = record
    rows = []
    for found in grounder.run(jobs):
        row = {k: found[k] for k in ("image_id", "phrase", "token_indices", "status", "error")}
        row.update({"mask_area": math.nan, **{f"share_{g}": math.nan for g in groups}})
        if found["status"] == STATUS_OK:
            mask = torch.from_numpy(rle_decode(found["mask"]))[None]
            row["mask_area"] = float(mask.float().mean())
            shares = image_shares(by_id[found["image_id"]], groups, [found["token_indices"]], mask)
            row.update({f"share_{g}": float(v[0]) for g, v in shares.items()})
        rows.append(row)
    return rows, samples


def summarize_grounding(rows: Sequence[dict], groups: Sequence[str]) -> dict:
    """Flat metrics: mean share per group over scored (image, category) pairs, their mean, counts by status.

    ``mask_area_mean`` is the share a spatially uniform attention map would get (the chance level).
    """
    table = pd.DataFrame(list(rows), columns=["status", "mask_area", *[f"share_{g}" for g in groups]])
    scored = table[table["status"] == STATUS_OK]
    out: dict = {"categories": int(len(table)), "categories_scored": int(len(scored))}
    out.update({f"status_{k}": int(v) for k, v in table["status"].value_counts().items()})
    for g in groups:
        out[f"share_{g}"] = float(scored[f"share_{g}"].mean()) if len(scored) else math.nan
    values = [out[f"share_{g}"] for g in groups]
    out["share_mean"] = float(np.mean(values)) if values and len(scored) else math.nan
    out["mask_area_mean"] = float(scored["mask_area"].mean()) if len(scored) else math.nan
    return out


GROUNDING_FAILURES = ("inference_failed", "missing_image")  # Grounded-SAM raised; the image was not generated


def compare_with_samples(samples_dir: Path, samples: Sequence[dict], items: Sequence[SampleItem]) -> dict:
    """How the regenerated images compare with the ``sample`` stage's images of the same keys.

    Returns ``images_compared``, ``images_identical`` and ``max_pixel_diff`` (0-255); zeros and a
    logged note when the sample shards are absent.
    """
    if not Path(samples_dir).is_dir():
        log.warning("%s absent: regenerated images not compared with the sample stage's", samples_dir)
        return {"images_compared": 0, "images_identical": 0, "max_pixel_diff": None}
    wanted = {(item.prompt_id, item.image_index) for item in items}
    stored = {(r["prompt_id"], r["image_index"]): r["image"] for r in
              iter_rows(Path(samples_dir), columns=["prompt_id", "image_index", "image", "status"])
              if r["status"] == STATUS_OK and (r["prompt_id"], r["image_index"]) in wanted}
    compared = identical = 0
    worst = 0
    for item, sample in zip(items, samples):
        ref = stored.get((item.prompt_id, item.image_index))
        if ref is None or sample["status"] != STATUS_OK:
            continue
        a = np.asarray(image_from_bytes(sample["image"]), dtype=np.int16)
        b = np.asarray(image_from_bytes(ref), dtype=np.int16)
        diff = int(np.abs(a - b).max()) if a.shape == b.shape else 255
        compared, identical, worst = compared + 1, identical + (diff == 0), max(worst, diff)
    return {"images_compared": compared, "images_identical": identical,
            "max_pixel_diff": worst if compared else None}
