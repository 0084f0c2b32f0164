"""Folders that stages hand to each other, named once (they are DVC outputs, so they are not params)."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path("artifacts/models")  # the models stage's output: one folder per embedded model
STEPS_DIR = Path("artifacts/train/steps")  # stage checkpoint@<N>: the UNet at training step N in <N>/unet
