"""Seconds per generated image of an evaluated model (stage ``latency@<model>``; docs/fid.md §8).

Two settings are timed: ``original``, the published latency column's (TokenCompose README: 50 steps, one
image per call, fp32; ``latency.original``), and ``pipeline``, this project's sampling settings
(``profiles.<p>.sampling``: steps, batch size, dtype, compilation). Each runs ``warmup`` untimed calls, then
calls of ``batch_size`` MultiGen prompts until ``images`` images are made; a call is timed from the prompts to
the PNG bytes of its images (CUDA synchronised on both ends), and seconds per image is a call's time over its
images. The numbers belong to the hardware they were measured on, which the record names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipeline.config import DtypeName, NonNegativeInt, PositiveInt, StageError
from pipeline.sampling.items import SampleItem
from pipeline.sampling.sampler import Sampler
from pipeline.sampling.settings import SamplingScale
from pipeline.store.shards import STATUS_OK


@dataclass(frozen=True)
class LatencySetting:
    """Steps, images per pipeline call and dtype of one timed setting."""

    num_inference_steps: PositiveInt = 50
    batch_size: PositiveInt = 1
    dtype: DtypeName = "float32"


@dataclass(frozen=True)
class LatencyCfg:
    """Top-level ``latency``: the setting of the published latency column (50 steps, batch 1, fp32)."""

    original: LatencySetting = field(default_factory=LatencySetting)


@dataclass(frozen=True)
class LatencyScale:
    """``profiles.<p>.latency``: timed images per setting after ``warmup`` untimed calls."""

    images: PositiveInt = 10
    warmup: NonNegativeInt = 2


def hardware_name(device: torch.device) -> str:
    """The accelerator's name (``NVIDIA H100 80GB HBM3``), or the CPU's model name and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    model = platform.processor() or platform.machine()
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def timed_scale(scale: SamplingScale, setting: LatencySetting) -> SamplingScale:
    """``scale`` with a timed setting's steps, batch size and dtype (not compiled: the original was eager)."""
    return dataclasses.replace(scale, num_inference_steps=setting.num_inference_steps,
                               batch_size=setting.batch_size, dtype=setting.dtype, compile=False)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_times(sampler: Sampler, items: Sequence[SampleItem], images: int, warmup: int,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per image of each timed call: ``warmup`` untimed calls, then ``ceil(images / batch)`` timed
    calls of ``batch`` items each (``items`` reused in turn; ``batch`` = ``sampler.scale.batch_size``)."""
    batch = sampler.scale.batch_size
    calls = warmup + math.ceil(images / batch)
    device = sampler.pipe.unet.device
    out = []
    for n in range(calls):
        chosen = [items[(n * batch + j) % len(items)] for j in range(batch)]
        _synchronize(device)
        start = clock()
        rows = sampler.rows(chosen)
        _synchronize(device)
        seconds = clock() - start
        failed = [r for r in rows if r["status"] != STATUS_OK]
        if failed:
            raise StageError(f"latency: prompt {failed[0]['prompt']!r} failed ({failed[0]['error']}); a timing "
                             f"of failed images would mean nothing")
        if n >= warmup:
            out.append(seconds / len(rows))
    return out


def latency_record(times: Sequence[float], scale: SamplingScale, sampler: Sampler) -> dict[str, Any]:
    """Mean and std (over timed calls) of seconds per image, with the setting that was timed."""
    values = np.asarray(times, dtype=np.float64)
    return {"seconds_per_image": float(values.mean()),
            "seconds_per_image_std": float(values.std(ddof=1)) if len(values) > 1 else None,  # one call: none
            "timed_calls": int(len(values)), "images": int(len(values) * scale.batch_size),
            "num_inference_steps": scale.num_inference_steps, "batch_size": scale.batch_size,
            "dtype": str(sampler.pipe.unet.dtype), "size": sampler.size}
