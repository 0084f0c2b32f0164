"""Stage `edit_data`: the editing benchmark in PIE-Bench's layout (SPEC §5.1-5.3).

``source: demo`` draws ``demo_data.num_edits`` scenes (one object on a table, mask over the object);
``source: piebench`` validates the user's PIE-Bench copy at ``root`` and copies it; entries whose image path
leaves ``annotation_images/`` or whose mask lies past the 512x512 frame are left out and counted
(``bad_input``, ``bad_input_<reason>``).
Outs: artifacts/data/piebench/ (mapping_file.json + annotation_images/), metrics/edit_data.json.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.config import ConfigError, load_params, section
from pipeline.datasets.demo_piebench import write_demo_piebench
from pipeline.datasets.demo_scale import DemoDataScale
from pipeline.datasets.piebench_files import (PIE_SIZE, PIEBENCH_HELP, EditDataScale, copy_piebench, piebench_summary,
                                              rejected_summary)
from pipeline.fetch import sha256_bytes
from pipeline.runtime import run_stage, stage_argument, write_json

log = logging.getLogger("stages.edit_data")
OUT = Path("artifacts/data/piebench")


def main() -> None:
    params = load_params()
    cfg = section(params, "profile.edit_data", EditDataScale)
    if OUT.exists():
        shutil.rmtree(OUT)
    if cfg.source == "demo":
        num_edits = section(params, "profile.demo_data", DemoDataScale).num_edits
        entries = write_demo_piebench(OUT, num_edits, params["seed"], cfg.size)
        size, rejected = cfg.size, []
    else:
        if not cfg.root:
            raise ConfigError(f"profiles.{params['profile']}.edit_data.root: empty. {PIEBENCH_HELP}")
        entries, rejected = copy_piebench(Path(cfg.root), OUT)
        size = PIE_SIZE
    if rejected:
        log.warning("edit_data: %d entries of %s left out (first: %s); the reasons are counted in "
                    "metrics/edit_data.json (bad_input_<reason>)", len(rejected), cfg.root,
                    ", ".join(f"{image_id} ({reason})" for image_id, reason in rejected[:5]))
    summary = {**piebench_summary(entries, size), **rejected_summary(rejected)}
    mapping_hash = sha256_bytes((OUT / "mapping_file.json").read_bytes())
    log.info("edit_data: %s", summary)
    write_json("metrics/edit_data.json", {"profile": params["profile"], "source": cfg.source,
                                          "mapping_sha256": mapping_hash, **summary})


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
