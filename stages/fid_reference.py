"""Stage `fid_reference`: feature statistics of each reference set's real images, computed once (docs/fid.md).

Each usable real image is centre-cropped to a square and resized to ``profiles.<p>.fid.image_size``
(PIL bicubic), then the extractor (``profiles.<p>.fid.extractor``) gives its features; their mean and
covariance (float64, streamed) are saved per set. Every `fid@<model>` reads them instead of recomputing.
Deps: artifacts/data/fid/images. Outs: artifacts/fid/reference/ (<name>.npz, reference.json with the
extractor's identity and the image counts; the embedded extractor's files in extractor/).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.config import load_params, profile_fields, section
from pipeline.photorealism.features import open_extractor
from pipeline.photorealism.real_images import IMAGES_DIR, real_image_batches
from pipeline.photorealism.settings import EmbeddedSeed, FidScale
from pipeline.runtime import rank_device, run_stage, stage_argument

log = logging.getLogger("stages.fid_reference")
OUT = Path("artifacts/fid/reference")


def main() -> None:
    params = load_params()
    scale = section(params, "profile.fid", FidScale)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    extractor, identity = open_extractor(scale.extractor, OUT / "extractor", scale.inception_weights,
                                         profile_fields(params, EmbeddedSeed).embedded_seed,
                                         build=True, batch_size=scale.batch_size, device=rank_device())
    record: dict = {"extractor": identity, "image_size": scale.image_size, "sets": {}}
    for name in scale.references:
        batches = real_image_batches(IMAGES_DIR / name, scale.image_size, scale.batch_size)
        stats = extractor.stats(tqdm(batches, desc=f"fid_reference {name}", unit="batch"))
        stats.save(OUT / f"{name}.npz")
        record["sets"][name] = {"real_images": stats.count}
        log.info("fid_reference %s: statistics of %d real images (%s, %d-d)", name, stats.count,
                 identity["name"], identity["dim"])
    (OUT / "reference.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
