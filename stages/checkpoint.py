"""Stage `checkpoint@<STEP>`: the UNet of the training run's checkpoint at STEP, exported as a model.

Usage: ``python -m stages.checkpoint STEP`` (the steps are ``checkpoint_steps`` in params.yaml). Deps: the
final UNet of stage train (its training_run.json names the run whose checkpoint is exported); the checkpoint
itself is read from artifacts/train/checkpoints/<run>/checkpoint-<STEP>. Outs: artifacts/train/steps/<STEP>/
(unet/ in diffusers layout, the EMA weights when the run kept an EMA; state.json: step, run, ema), which the
evaluation stages use as the model ``step_<STEP>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.paths import STEPS_DIR
from pipeline.runtime import run_stage, stage_argument
from pipeline.training.export import export_checkpoint, find_checkpoint, trained_run

log = logging.getLogger("stages.checkpoint")
TRAINED_UNET, CHECKPOINTS = Path("artifacts/train/unet"), Path("artifacts/train/checkpoints")


def main(step_text: str) -> None:
    if not step_text.isdigit():
        raise ConfigError(f"checkpoint_steps: {step_text!r} is not a training step (a positive integer)")
    step = int(step_text)
    checkpoint = find_checkpoint(CHECKPOINTS, trained_run(TRAINED_UNET), step)
    state = export_checkpoint(checkpoint, STEPS_DIR / str(step))
    log.info("checkpoint@%d: exported %s%s to %s", step, checkpoint, " (EMA weights)" if state["ema"] else "",
             STEPS_DIR / str(step))


if __name__ == "__main__":
    run_stage(main, stage_argument(__doc__, "STEP", "a training step listed in checkpoint_steps"))
