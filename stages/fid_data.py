"""Stage `fid_data`: the captions and real images of each FID reference set (docs/fid.md).

``profiles.<p>.fid.references.<name>`` names each set's source: ``coco`` (val2017 captions file and images,
fetched and checked), ``flickr30k_entities`` (a local folder) or ``demo`` (drawn scenes).
Outs: artifacts/data/fid/captions/<name>.json (the prompts; the sampling stages depend on these only),
artifacts/data/fid/images/<name>/ (Parquet shards, persist: a rerun keeps finished shards after decoding
every stored image, fetches failed downloads and damaged shards again, and stops when a refetched image
changed at its source), metrics/fid_data.json (per set: counts, failures, the SHA-256 of the captions file or val.txt).
"""

from __future__ import annotations

import json
import logging
import shutil

from pipeline.config import load_params, section
from pipeline.photorealism.captions import CAPTIONS_DIR
from pipeline.photorealism.real_images import IMAGES_DIR
from pipeline.photorealism.references import STATUS_DOWNLOAD_FAILED, build_reference, image_rows
from pipeline.photorealism.settings import FidCfg, FidScale
from pipeline.runtime import check_failure_rate, run_stage, stage_argument, write_json
from pipeline.store.codecs import undecodable_images
from pipeline.store.identity import code_digest, fingerprint_of
from pipeline.store.shards import read_shards, write_shards

log = logging.getLogger("stages.fid_data")


def remove_stale_sets(names: set[str]) -> None:
    """Delete the captions and images of reference sets no longer in params (the images output persists)."""
    CAPTIONS_DIR.mkdir(parents=True, exist_ok=True)
    for path in CAPTIONS_DIR.glob("*.json"):
        if path.stem not in names:
            path.unlink()
    for path in IMAGES_DIR.glob("*"):
        if path.is_dir() and path.name not in names:
            shutil.rmtree(path)


def main() -> None:
    params = load_params()
    cfg, scale = section(params, "fid", FidCfg), section(params, "profile.fid", FidScale)
    seed, where = int(params["seed"]), f"profiles.{params['profile']}.fid"
    metrics: dict = {"profile": params["profile"], "seed": seed}
    remove_stale_sets(set(scale.references))
    for name, spec in scale.references.items():
        ref = build_reference(name, spec, seed, f"{where}.references.{name}")
        doc = {"reference": name, "source": ref.source, "captions": ref.captions}
        (CAPTIONS_DIR / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        out = IMAGES_DIR / name
        write_shards(out, ref.images, image_rows(seed, out, f"{where}.references.{name}"), scale.shard_size,
                     {"source": ref.source, "seed": seed, "jobs": fingerprint_of([j.location for j in ref.images])},
                     code=code_digest("pipeline.photorealism.references"), desc=f"fid_data {name}",
                     redo_statuses=(STATUS_DOWNLOAD_FAILED,), verify=undecodable_images)
        rows = read_shards(out, columns=["status"])
        failed = rows["status"].value_counts().drop("ok", errors="ignore").to_dict()
        metrics[name] = {"source": ref.source, "source_sha256": ref.source_sha256, "captions": len(ref.captions),
                         "real_images": int(len(rows)),
                         "failed": {str(k): int(v) for k, v in failed.items()}}
        log.info("fid_data %s: %d captions, %d real images, %d failed", name, len(ref.captions), len(rows),
                 sum(failed.values()))
    write_json("metrics/fid_data.json", metrics)
    for name in scale.references:
        check_failure_rate(metrics[name]["failed"], metrics[name]["real_images"], cfg.max_failed_rate,
                           f"fid_data {name} real images", "fid.max_failed_rate",
                           f"see the `status`/`error` columns of {IMAGES_DIR / name} (failed downloads are "
                           f"fetched again on a rerun)", retried=(STATUS_DOWNLOAD_FAILED,))


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
