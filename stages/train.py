"""Stage `train`: TokenCompose fine-tuning of the profile's Stable Diffusion UNet (SPEC §1.5).

Deps: artifacts/data/images/ (split "train"), artifacts/masks/, artifacts/models/ (embedded models).
Outs: artifacts/train/unet/ (diffusers layout, safetensors, and training_run.json: the run's settings
fingerprint and steps); artifacts/train/checkpoints/<run fingerprint>/ (not a DVC output: one folder per
run key, with run.json naming its settings; a run resumes from its own key after a kill, and the keys of
other settings are kept), metrics/train.json, plots/train_curves.csv; artifacts/train/this_run.json (where this
run resumed, what it computed and how fast; not a DVC output). Multi-GPU: `accelerate launch -m stages.train`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Pixels, load_params, profile_fields, section
from pipeline.paths import MODELS_DIR
from pipeline.runtime import dist_info, run_stage, stage_argument, write_json
from pipeline.training.curves import write_curves
from pipeline.training.losses import LossCfg
from pipeline.training.settings import OptimCfg, TrainCfg, TrainRun, TrainScale
from pipeline.training.sources import check_grounded, load_records
from pipeline.training.trainer import train

log = logging.getLogger("stages.train")

IMAGES, MASKS, OUT = Path("artifacts/data/images"), Path("artifacts/masks"), Path("artifacts/train")
METRICS, CURVES = Path("metrics/train.json"), Path("plots/train_curves.csv")
THIS_RUN = OUT / "this_run.json"  # resume step, samples, seconds, samples/s: not a DVC output


@dataclass(frozen=True)
class ModelScale:
    """The keys of ``profiles.<p>`` this stage reads besides ``train``."""

    sd_model: str
    resolution: Pixels


def main() -> None:
    params = load_params()
    m = profile_fields(params, ModelScale)  # a missing key -> ConfigError naming it
    run = TrainRun(
        sd_model=m.sd_model, models_dir=MODELS_DIR, resolution=m.resolution, seed=int(params["seed"]),
        loss=section(params, "loss", LossCfg), optim=section(params, "optim", OptimCfg),
        train=section(params, "train", TrainCfg), scale=section(params, "profile.train", TrainScale), out_dir=OUT,
    )
    records, data_stats = load_records(IMAGES, MASKS, run.resolution, run.train.skip_ungrounded,
                                       run.train.max_word_skip_rate, run.train.empty_masks,
                                       run.train.max_corrupt_rate)
    check_grounded(data_stats, run.loss)
    log.info("training on %d images (%d with masks, %d words)", data_stats["images_used"],
             data_stats["images_grounded"], data_stats["words_used"])
    result = train(run, records)
    if not dist_info().is_main:
        return
    write_curves(CURVES, result.curves)
    metrics = {k: v for k, v in result.metrics.items() if k != "fingerprint"}  # in unet/training_run.json
    write_json(METRICS, {"profile": params["profile"], **metrics, **data_stats})
    write_json(THIS_RUN, result.this_run)
    log.info("train: %s", result.this_run)


if __name__ == "__main__":
    stage_argument(__doc__)
    run_stage(main)
