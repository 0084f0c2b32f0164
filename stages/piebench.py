"""Stage `piebench@<backbone>`: PIE-Bench metrics of one backbone's edits (SPEC §5.4-5.6).

Usage: ``python -m stages.piebench <backbone>``.
Outs: metrics/piebench/<backbone>.json (table-scaled means, overall and per editing type, with counts),
plots/piebench/<backbone>.csv (raw metrics per image), plots/edits/<backbone>.png (source / mask / edit).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.datasets.piebench_files import MAPPING_FILE, read_mapping
from pipeline.eval_models import edit_backbone
from pipeline.paths import MODELS_DIR
from pipeline.piebench import PieBenchCfg, PieBenchScale, PieBenchScorer, edits_figure, score_edits, summarize
from pipeline.runtime import default_device, run_stage, stage_argument, write_json
from pipeline.store.shards import iter_rows

log = logging.getLogger("stages.piebench")
DATA = Path("artifacts/data/piebench")


def main(name: str) -> None:
    params = load_params()
    cfg = section(params, "piebench", PieBenchCfg)
    scale = section(params, "profile.piebench", PieBenchScale)
    backbone = edit_backbone(params, name)
    scorer = PieBenchScorer.load(scale, cfg, MODELS_DIR, params["seed"], default_device())
    entries = read_mapping(DATA / MAPPING_FILE)
    edits = {row["image_id"]: row for row in iter_rows(Path("artifacts/edits") / name)}
    scores, panels = score_edits(scorer, DATA, entries, edits, cfg, scale.panels)
    for folder in ("plots/piebench", "plots/edits"):
        Path(folder).mkdir(parents=True, exist_ok=True)
    scores.to_csv(f"plots/piebench/{name}.csv", index=False, na_rep="nan")
    edits_figure(panels, f"plots/edits/{name}.png")
    summary = summarize(scores)
    write_json(f"metrics/piebench/{name}.json", {
        "backbone": name, "model": backbone.model, "unet": backbone.unet or "",
        **asdict(cfg), **asdict(scale), **summary})
    log.info("piebench %s: %d of %d images scored; PSNR %.2f, CLIP whole %.2f", name, summary["scored"],
             summary["images"], summary["psnr_unedit_part"], summary["clip_whole"])


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "BACKBONE", "a key of edit_backbones, or step_<N> (a checkpoint)"))
