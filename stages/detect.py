"""Stage `detect@<model>`: OWLv2 detections on one model's MultiGen images (SPEC §3.3).

Usage: ``python -m stages.detect MODEL`` (or ``accelerate launch``; ranks split the shards).
Deps: artifacts/samples/<MODEL>/. Outs: artifacts/detections/<MODEL>/<set>/ (Parquet shards, persist),
one row per image with every box's score and label, so MG can be rescored at any threshold.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.multigen.detection import detect_prompt_set, detector_fingerprint, load_detector
from pipeline.multigen.settings import MultiGenCfg, MultiGenScale
from pipeline.paths import MODELS_DIR
from pipeline.runtime import dist_info, rank_device, run_stage, stage_argument

log = logging.getLogger("stages.detect")


def main(key: str) -> None:
    params = load_params()
    mg, scale = section(params, "multigen", MultiGenCfg), section(params, "profile.multigen", MultiGenScale)
    dist = dist_info()
    models_dir = MODELS_DIR
    detector = load_detector(scale.detector, models_dir, rank_device(), scale.dtype, scale.image_backend)
    fingerprint = detector_fingerprint(detector, scale, mg.query_template)
    for name in mg.prompt_sets:
        detect_prompt_set(detector, Path("artifacts/samples") / key / name, Path("artifacts/detections") / key / name,
                          mg.query_template, scale, fingerprint, dist.rank, dist.world_size)
        log.info("%s/%s: detections written", key, name)


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "MODEL", "a key of eval_models in params.yaml"))
