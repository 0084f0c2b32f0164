"""Stage `masks`: one row per (image, phrase) with its mask (SPEC §2), from Grounded-SAM or the authors' PNGs.

Runs as one process (CPU or one GPU) or under ``accelerate launch -m stages.masks`` with one process per
GPU, each writing its own shards. Outs: artifacts/masks/ (persistent, resumable shards),
metrics/masks.json, plots/masks_overlay.png.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, Pixels, active_profile, load_params, profile_fields, section
from pipeline.masks.authors import write_authors_masks
from pipeline.masks.grounded_sam import ImageStore, write_grounded_masks
from pipeline.masks.inputs import RunContext
from pipeline.masks.overlay import plot_overlay
from pipeline.masks.params import GroundingCfg, MasksScale
from pipeline.masks.summary import report_and_check, summarize
from pipeline.models import inference_dtype
from pipeline.paths import MODELS_DIR
from pipeline.runtime import dist_info, rank_device, run_stage, stage_argument, wait_for_everyone, write_json
from pipeline.store.shards import STATUS_OK, read_shards

log = logging.getLogger("stages.masks")
OUT = Path("artifacts/masks")
NOUNS = Path("artifacts/nouns")
IMAGES = Path("artifacts/data/images")


@dataclass(frozen=True)
class ProfileKeys:
    """The top-level keys of ``profiles.<p>`` this stage reads."""

    resolution: Pixels


def main() -> None:
    params = load_params()
    cfg = section(params, "grounding", GroundingCfg)
    scale = section(params, "profile.masks", MasksScale)
    prof = profile_fields(params, ProfileKeys)
    info = dist_info()
    ctx = RunContext(out_dir=OUT, nouns_dir=NOUNS, images_dir=IMAGES, models_dir=MODELS_DIR,
                     resolution=prof.resolution, device=rank_device(),
                     rank=info.rank, world_size=info.world_size, barrier=wait_for_everyone)
    if scale.source == "grounded_sam":
        write_grounded_masks(ctx, cfg, scale)
    else:
        phrases = active_profile(params).get("text", {}).get("phrases")
        if phrases != "authors":  # the authors' words must be aligned where they are, not re-tagged
            raise ConfigError(f"profiles.{params['profile']}.masks.source: authors needs "
                              f"profiles.{params['profile']}.text.phrases: authors (it is {phrases!r}): the "
                              f"authors' mask words are looked up in artifacts/nouns, and the tagger misses "
                              f"about a tenth of them")
        write_authors_masks(ctx, scale)
    wait_for_everyone()  # returns at once for one process
    if not info.is_main:
        return
    rows = read_shards(OUT).to_dict("records")
    metrics = summarize(rows)
    shown = [r for r in rows if r["status"] == STATUS_OK][: 20 * scale.overlay_images]
    images = {} if scale.source == "authors" and not IMAGES.is_dir() else ImageStore(IMAGES).load(
        r["image_id"] for r in shown)
    drawn = plot_overlay(rows, {k: v[0] for k, v in images.items() if v[0] is not None},
                         Path("plots/masks_overlay.png"), scale.overlay_images)
    metrics.update(profile=params["profile"], source=scale.source, box_threshold=cfg.box_threshold,
                   text_threshold=cfg.text_threshold, detector=scale.detector if scale.source != "authors" else "",
                   segmenter=scale.segmenter if scale.source != "authors" else "",
                   resolution=ctx.resolution, device=str(ctx.device), world_size=info.world_size,
                   dtype=str(inference_dtype(scale.dtype, ctx.device)).removeprefix("torch."), overlay_images=drawn)
    write_json("metrics/masks.json", metrics)
    log.info("masks: %d rows, %d with a mask, %d images", metrics["rows"], metrics["phrases_with_mask"],
             metrics["images"])
    report_and_check(rows, metrics, cfg, str(OUT))


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
