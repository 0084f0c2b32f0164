"""Stage `detect@<model>`: OWLv2 detections on one model's MultiGen images (SPEC §3.3).

Usage: ``python -m stages.detect MODEL`` (or ``accelerate launch``; ranks split the shards).
Deps: artifacts/samples/<MODEL>/. Outs: artifacts/detections/<MODEL>/<set>/ (Parquet shards, persist),
one row per image with every box's score and label, so MG can be rescored at any threshold.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.failures import prompt_image_id, report_failures
from pipeline.multigen.detection import (STATUS_CORRUPT_IMAGE, STATUS_DETECT_FAILED, STATUS_NO_IMAGE, detect_prompt_set,
                                         detector_fingerprint, load_detector)
from pipeline.multigen.settings import MultiGenCfg, MultiGenScale
from pipeline.paths import MODELS_DIR
from pipeline.runtime import dist_info, rank_device, run_stage, stage_argument
from pipeline.store.shards import read_table

log = logging.getLogger("stages.detect")
RETRIED = {STATUS_DETECT_FAILED}  # detect_prompt_set's redo_statuses


def remedies(key: str) -> dict[str, str]:
    """What fixes the detection statuses this stage does not retry itself."""
    return {STATUS_NO_IMAGE: f"the image's sampling failed: sample@{key} retries its sample_failed images, and "
                             f"this stage then detects them again; nan_image and token_indices_failed stay",
            STATUS_CORRUPT_IMAGE: f"not retried: the PNG in artifacts/samples/{key} does not decode; delete that "
                                  f"sample shard and run `dvc repro -f -s sample@{key}`"}


def main(key: str) -> None:
    params = load_params()
    mg, scale = section(params, "multigen", MultiGenCfg), section(params, "profile.multigen", MultiGenScale)
    dist = dist_info()
    models_dir = MODELS_DIR
    detector = load_detector(scale.detector, models_dir, rank_device(), scale.dtype, scale.image_backend)
    fingerprint = detector_fingerprint(detector, scale, mg.query_template)
    for name in mg.prompt_sets:
        written = detect_prompt_set(detector, Path("artifacts/samples") / key / name,
                                    Path("artifacts/detections") / key / name, mg.query_template, scale, fingerprint,
                                    dist.rank, dist.world_size)
        log.info("%s/%s: detections written", key, name)
        rows = [r for path in written for r in read_table(path, ["prompt_id", "image_index", "status"]).to_pylist()]
        mine = f" (rank {dist.rank} of {dist.world_size})" if dist.world_size > 1 else ""
        report_failures(log, rows, prompt_image_id, RETRIED, where=f"detect@{key} {name}{mine}", remedies=remedies(key),
                        unit="images", id_name="prompt/image")


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "MODEL", "a key of eval_models in params.yaml"))
