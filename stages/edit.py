"""Stage `edit@<backbone>`: Blended Latent Diffusion on the PIE-Bench set with one backbone (SPEC §4).

Usage: ``python -m stages.edit <backbone>`` with a key of ``edit_backbones`` (an evaluation model) or ``step_<N>``.
Outs: artifacts/edits/<backbone>/ (shards: image_id, image (PNG), prompt, seed, mask_fraction, status,
error; resumable), metrics/edit/<backbone>.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from PIL import Image

from pipeline.config import load_params, section
from pipeline.datasets.piebench_files import MAPPING_FILE, load_example, read_mapping, strip_brackets
from pipeline.editing import (STATUS_BAD_INPUT, STATUS_EDIT_FAILED, BlendedLatentEditor, EditingCfg, EditingScale,
                              EditItem, edit_fingerprint, edit_rows)
from pipeline.eval_models import edit_backbone
from pipeline.failures import report_failures
from pipeline.models import inference_dtype, load_sd_pipeline
from pipeline.paths import MODELS_DIR
from pipeline.runtime import (check_failure_rate, dist_info, rank_device, run_stage, stage_argument, wait_for_everyone,
                              write_json)
from pipeline.store.identity import code_digest
from pipeline.store.shards import STATUS_OK, prepare_for_ranks, read_shards, write_shards

log = logging.getLogger("stages.edit")
DATA = Path("artifacts/data/piebench")
RETRIED = {STATUS_EDIT_FAILED}  # write_shards' redo_statuses below
REMEDIES = {STATUS_BAD_INPUT: f"not retried: fix the input: the source image or mask in {DATA} does not load"}


def load(image_id: str, entry) -> EditItem:
    image, mask = load_example(DATA, entry)
    return EditItem(image_id, Image.fromarray(image), mask, strip_brackets(entry.editing_prompt))


def main(name: str) -> None:
    params = load_params()
    cfg = section(params, "editing", EditingCfg)
    scale = section(params, "profile.editing", EditingScale)
    backbone, dist = edit_backbone(params, name), dist_info()  # one process, or one per GPU under accelerate
    device = rank_device()
    pipe = load_sd_pipeline(backbone.model, MODELS_DIR, unet_ref=backbone.unet,
                            torch_dtype=inference_dtype(scale.dtype, device), device=device)
    editor = BlendedLatentEditor(pipe, cfg, scale.num_inference_steps, params["seed"])
    records = sorted(read_mapping(DATA / MAPPING_FILE).items())
    out_dir = Path("artifacts/edits") / name
    start, fingerprint = time.perf_counter(), edit_fingerprint(editor, backbone, DATA)
    rank, world = dist.rank, dist.world_size
    code = code_digest("pipeline.editing")  # the code that computes the rows, not this script
    prepare_for_ranks(out_dir, len(records), scale.shard_size, fingerprint, rank, wait_for_everyone, code)
    write_shards(out_dir, records, lambda chunk: edit_rows(editor, chunk, load, scale.batch_size),
                 scale.shard_size, fingerprint, rank, world, code=code,
                 desc=f"edit {name}", redo_statuses=tuple(RETRIED))
    wait_for_everyone()
    if not dist.is_main:
        return
    rows = read_shards(out_dir, columns=["image_id", "status", "mask_fraction"])
    ok = int((rows["status"] == STATUS_OK).sum())
    write_json(f"metrics/edit/{name}.json", {
        "backbone": name, "model": backbone.model, "unet": backbone.unet or "", "images": len(rows), "ok": ok,
        "failed": len(rows) - ok, "resolution": editor.resolution, "steps": scale.num_inference_steps,
        "loop_steps": len(editor.loop_timesteps()), "init": cfg.init, "blend": cfg.blend,
        "guidance_scale": cfg.guidance_scale, "blending_start": cfg.blending_start,
        "mean_latent_mask_fraction": float(rows["mask_fraction"].mean()) if ok else None})
    log.info("edit %s: %d images in %.1f s", name, len(rows), time.perf_counter() - start)
    failures = report_failures(log, rows.to_dict("records"), lambda row: str(row["image_id"]), RETRIED,
                               where=f"edit@{name}", remedies=REMEDIES, unit="edits", id_name="image")
    check_failure_rate(failures.counts, len(rows), cfg.max_failed_rate, f"edit {name}", "editing.max_failed_rate",
                       f"see the status/error columns of {out_dir}", retried=RETRIED, remedies=REMEDIES)


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "BACKBONE", "a key of edit_backbones, or step_<N> (a checkpoint)"))
