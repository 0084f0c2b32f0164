"""Training params: the ``optim`` and ``train`` sections, the profile's ``train`` sizes, and a whole run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import Fraction, FractionBelowOne, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from pipeline.training.losses import LossCfg


@dataclass(frozen=True)
class OptimCfg:
    """Params section ``optim`` (AdamW, clipping, schedule)."""

    lr: PositiveFloat
    weight_decay: NonNegativeFloat
    beta1: FractionBelowOne
    beta2: FractionBelowOne
    eps: PositiveFloat
    max_grad_norm: PositiveFloat
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0


@dataclass(frozen=True)
class TrainCfg:
    """Params section ``train`` (method choices shared by all profiles)."""

    skip_ungrounded: bool = False
    empty_masks: Literal["zero_target", "skip"] = "zero_target"  # words whose mask is empty (EMPTY_TARGET_STATUSES)
    use_ema: bool = False
    ema_decay: Fraction = 0.9999
    checkpoint_limit: NonNegativeInt = 10  # checkpoints kept per run; 0: keep every one
    max_word_skip_rate: Fraction = 0.01  # fail when more usable-status mask rows than this do not fit the images
    max_corrupt_rate: Fraction = 0.01  # fail when more ok training images than this do not decode


@dataclass(frozen=True)
class TrainScale:
    """Params section ``profiles.<p>.train`` (sizes, steps, hardware options)."""

    batch_size: PositiveInt
    grad_accum: PositiveInt
    max_steps: PositiveInt
    checkpoint_every: PositiveInt
    mixed_precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # not "no": YAML 1.1 reads a bare no as false
    gradient_checkpointing: bool = False
    compile: bool = False            # torch.compile the UNet (capture processors included); first step compiles
    cache_latents: bool = True       # encode each image once per run (LatentCache), not at every step
    num_workers: NonNegativeInt = 0


@dataclass(frozen=True)
class TrainRun:
    """Everything one training run needs besides its data."""

    sd_model: str
    models_dir: Path
    resolution: int
    seed: int
    loss: LossCfg
    optim: OptimCfg
    train: TrainCfg
    scale: TrainScale
    out_dir: Path
