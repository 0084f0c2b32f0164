"""Params of MultiGen sampling: ``sampling`` (method, every profile) and ``profiles.<p>.sampling`` (scale)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import DtypeName, Fraction, NonNegativeFloat, NonNegativeInt, Pixels, PositiveInt

TokenRule = Literal["head_word", "last_piece"]  # Attend-and-Excite token rule (SPEC §6.3)


@dataclass(frozen=True)
class AttendExciteCfg:
    """``sampling.attend_excite``: diffusers' A&E arguments (SPEC §6.1 defaults) and the token rule."""

    max_iter_to_alter: NonNegativeInt = 25
    thresholds: dict[str, Fraction] = field(default_factory=lambda: {"0": 0.05, "10": 0.5, "20": 0.8})
    scale_factor: NonNegativeFloat = 20.0
    attn_res: tuple[PositiveInt, ...] | None = None  # None: ceil(size / 32) per side (16 x 16 at 512 px)
    token_rule: TokenRule = "head_word"      # head_word: all BPE pieces of the head word; last_piece: SPEC alt. A

    def __post_init__(self) -> None:
        bad = [k for k in self.thresholds if not str(k).isdigit()]
        if bad:
            raise ValueError(f"attend_excite.thresholds: keys are denoising step indices (0, 10, 20), got {bad}")
        if self.attn_res is not None and len(self.attn_res) != 2:
            raise ValueError(f"attend_excite.attn_res: give (height, width) of the attention grid or null, "
                             f"got {list(self.attn_res)}")


@dataclass(frozen=True)
class SamplingCfg:
    """Top-level ``sampling``: method settings identical in every profile."""

    guidance_scale: float = 7.5
    scheduler: str = "default"   # "default": the model's own; else a diffusers scheduler class name
    attend_excite: AttendExciteCfg = AttendExciteCfg()

    def __post_init__(self) -> None:
        if self.scheduler != "default":
            scheduler_class(self.scheduler)


@dataclass(frozen=True)
class SamplingScale:
    """``profiles.<p>.sampling``: how much is sampled and how."""

    num_inference_steps: PositiveInt = 50
    images_per_prompt: PositiveInt = 10
    batch_size: PositiveInt = 10      # images per pipeline call
    resolution: Pixels | None = None  # None: the model's default (unet sample_size x 8)
    dtype: DtypeName = "auto"         # auto: fp16 on CUDA, fp32 on CPU
    shard_size: PositiveInt = 100     # images per Parquet shard (the unit of resume)
    max_prompts: PositiveInt | None = None  # None: the whole prompt file
    compile: bool = False             # torch.compile the UNet (channels_last); plain SD only, not A&E


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class called ``name``; ``ValueError`` when diffusers has none."""
    import diffusers

    found = getattr(diffusers, name, None)
    if not (isinstance(found, type) and issubclass(found, diffusers.SchedulerMixin)):
        raise ValueError(f"scheduler: {name!r} is not a diffusers scheduler class (e.g. DDIMScheduler) "
                         f"or 'default'")
    return found
