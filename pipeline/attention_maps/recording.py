"""Cross-attention maps recorded while sampling, shared by the attention figures and the grounding measurement.

The capture itself lives in :mod:`pipeline.attention` (``AttentionStore.maps[group]`` is a list with one
tensor of shape (batch, heads, H*W, tokens) per layer call). This module turns those lists into maps:

* :func:`group_map` averages one resolution group over heads and layers → (batch, H*W, tokens);
* :func:`token_maps` picks token columns (summing the sub-tokens of a word) → (batch, K, h, w);
* :class:`RecordingPipe` / :func:`sample_with_attention` sample images with the sampler's seeds and keep
  the maps of every denoising step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pipeline.attention import capture_cross_attention, restore_attention, side_of
from pipeline.config import ConfigError, section
from pipeline.eval_models import EvalModel, EvalModelRef, eval_model
from pipeline.paths import MODELS_DIR
from pipeline.runtime import rank_device
from pipeline.sampling.items import SampleItem
from pipeline.sampling.sampler import STATUS_FAILED, Sampler, open_sampler
from pipeline.sampling.settings import SamplingCfg, SamplingScale


def conditional_half(maps: torch.Tensor, num_images: int) -> torch.Tensor:
    """The rows of the text-conditioned branch: (2*n or n, ...) → (n, ...).

    Under classifier-free guidance diffusers runs the UNet on ``[unconditional, conditional]``, so the
    conditional maps are the last ``num_images`` rows; without guidance the batch is already ``n``.
    """
    batch = maps.shape[0]
    if batch == num_images:
        return maps
    if batch == 2 * num_images:
        return maps[num_images:]
    raise ValueError(
        f"attention batch {batch} is neither {num_images} images nor {2 * num_images} (with guidance); "
        f"pass the number of images the pipeline generated"
    )


def group_map(layer_maps: Sequence[torch.Tensor], num_images: int | None = None) -> torch.Tensor:
    """Average a group's maps over layers and heads: [(B, heads, HW, T)] * L → (n, HW, T) float32.

    ``num_images`` keeps the conditional half under classifier-free guidance (:func:`conditional_half`);
    ``None`` keeps the whole batch. Every layer of a group has the same head count, so this equals the
    mean over all (layer, head) pairs.
    """
    if not layer_maps:
        raise ValueError("no attention maps captured for this group; was capture enabled for it?")
    shapes = {tuple(m.shape) for m in layer_maps}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"expected equal (batch, heads, H*W, tokens) maps per layer, got {sorted(shapes)}")
    stacked = torch.stack([m.detach().float() for m in layer_maps])  # (L, B, heads, HW, T)
    mean = stacked.mean(dim=(0, 2))
    return mean if num_images is None else conditional_half(mean, num_images)


def token_maps(group: torch.Tensor, token_indices: Sequence[Sequence[int]]) -> torch.Tensor:
    """Spatial maps of words: (B, HW, T) and K index lists → (B, K, h, w).

    The map of a word is the **sum** of its sub-token columns (as TokenCompose's pixel loss does,
    SPEC §1.4.3), so a word split into several BPE pieces keeps all its attention mass.
    """
    batch, queries, tokens = group.shape
    side = side_of(queries)
    out = torch.zeros(batch, len(token_indices), queries, dtype=group.dtype, device=group.device)
    for k, indices in enumerate(token_indices):
        if not indices or min(indices) < 0 or max(indices) >= tokens:
            raise ValueError(f"token indices {list(indices)} are empty or outside 0..{tokens - 1}")
        out[:, k] = group[:, :, list(indices)].sum(dim=-1)
    return out.reshape(batch, len(token_indices), side, side)


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (B, K, h, w) → (B, K, H, W); values stay within each map's range."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


class StepRecorder:
    """A ``callback_on_step_end`` for diffusers pipelines that keeps cross-attention maps per step.

    After each denoising step it averages every captured group over layers and heads (conditional half
    under guidance) with :func:`group_map`, keeps the result for the steps in ``keep_steps``, adds it to
    a running mean over all steps, and empties the store for the next step.

    Attributes:
        steps: step index -> group -> (n, H*W, tokens) float32 on CPU, for the kept steps.
        timesteps: step index -> scheduler timestep, for the kept steps.
        mean: group -> (n, H*W, tokens), the mean over all steps seen.
        num_steps: number of steps seen.
    """

    def __init__(self, store, num_images: int, keep_steps: Sequence[int] = ()):
        self.store = store
        self.num_images = num_images
        self.keep_steps = set(keep_steps)
        self.steps: dict[int, dict[str, torch.Tensor]] = {}
        self.timesteps: dict[int, int] = {}
        self.mean: dict[str, torch.Tensor] = {}
        self.num_steps = 0

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """Record step ``step`` (diffusers calls this after the scheduler step); returns the kwargs."""
        maps = {g: group_map(layers, self.num_images).cpu() for g, layers in self.store.maps.items() if layers}
        self.store.reset()
        if not maps:
            raise RuntimeError("no cross-attention captured during a denoising step; install capture "
                               "(pipeline.attention.capture_cross_attention) on the pipeline's UNet first")
        self.num_steps += 1
        for group, value in maps.items():
            previous = self.mean.get(group)
            self.mean[group] = value if previous is None else previous + (value - previous) / self.num_steps
        if step in self.keep_steps:
            self.steps[step] = maps
            self.timesteps[step] = int(timestep)
        return callback_kwargs


@dataclass
class ImageAttention:
    """Cross-attention recorded while one image was generated (conditional branch, CPU float32).

    Attributes:
        steps: step index -> group -> (H*W, tokens) maps of the kept steps.
        timesteps: step index -> scheduler timestep of the kept steps.
        mean: group -> (H*W, tokens), the mean over all denoising steps.
    """

    steps: dict[int, dict[str, torch.Tensor]]
    timesteps: dict[int, int]
    mean: dict[str, torch.Tensor]


class RecordingPipe:
    """A diffusers pipeline wrapper that records cross-attention per step of every call it serves.

    It forwards every attribute to the wrapped pipeline, so it can stand in for it wherever a pipeline is
    expected (e.g. ``pipeline.sampling.Sampler.pipe``); each ``__call__`` runs the real pipeline with a
    :class:`StepRecorder` as ``callback_on_step_end`` and appends one :class:`ImageAttention` per image
    to :attr:`records`, in call order; a call that raises records nothing (the sampler retries its images
    one by one, and :func:`sample_with_attention` pairs records with the rows that were sampled).
    """

    def __init__(self, pipe, store, keep_steps: Sequence[int] = ()):
        self._pipe = pipe
        self._store = store
        self._keep_steps = list(keep_steps)
        self.records: list[ImageAttention | None] = []

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def num_timesteps(self, num_inference_steps: int) -> int:
        """Denoising iterations of a call (:func:`denoising_iterations` of the wrapped pipeline)."""
        return denoising_iterations(self._pipe, num_inference_steps)

    def __call__(self, *args, **kwargs):
        prompt = kwargs.get("prompt", args[0] if args else None)
        num_images = len(prompt) if isinstance(prompt, list) else 1
        num_images *= kwargs.get("num_images_per_prompt", 1)
        total = self.num_timesteps(kwargs.get("num_inference_steps", 50))
        recorder = StepRecorder(self._store, num_images, resolve_steps(self._keep_steps, total))
        self._store.reset()
        out = self._pipe(*args, callback_on_step_end=recorder, **kwargs)
        for b in range(num_images):
            steps = {s: {g: m[b] for g, m in maps.items()} for s, maps in recorder.steps.items()}
            self.records.append(ImageAttention(steps, dict(recorder.timesteps),
                                               {g: m[b] for g, m in recorder.mean.items()}))
        return out


def denoising_iterations(pipe, num_inference_steps: int) -> int:
    """Denoising iterations of a pipeline call (PNDM with ``skip_prk_steps`` runs one more than asked)."""
    pipe.scheduler.set_timesteps(num_inference_steps)
    return len(pipe.scheduler.timesteps)


def recordable_model(params: dict[str, Any], key: str) -> tuple[EvalModel, EvalModelRef]:
    """The ``eval_models`` entry ``key`` and its references, checked to use the plain SD sampler (stages call
    this for every model before sampling any, so a bad key fails at once)."""
    model, ref = eval_model(params, key)
    if model.sampler != "sd":  # its pipeline installs its own attention processors over the capture
        raise ConfigError(f"eval_models.{key}: attention is recorded with the plain SD sampler only, and this "
                          f"model uses {model.sampler!r}; list plain SD models (e.g. sd14, trained)")
    return model, ref


def load_sampler(params: dict[str, Any], key: str) -> tuple[Sampler, EvalModelRef]:
    """The ``sample`` stage's sampler of model ``key`` (same pipeline, settings and seed) and its references.

    Returns (:class:`pipeline.sampling.Sampler`, :class:`pipeline.sampling.EvalModelRef`).
    """
    cfg, scale = section(params, "sampling", SamplingCfg), section(params, "profile.sampling", SamplingScale)
    model, ref = recordable_model(params, key)
    return open_sampler(ref, model, MODELS_DIR, cfg, scale, int(params["seed"]), rank_device()), ref


def sample_with_attention(sampler: Sampler, items: Sequence[SampleItem], groups: Sequence[str],
                          keep_steps: Sequence[int] = ()) -> tuple[list[dict], list[ImageAttention | None]]:
    """Sample ``items`` with :class:`pipeline.sampling.Sampler` while recording cross-attention.

    Returns the sampler's rows (one per item, same order) and one :class:`ImageAttention` per item
    (``None`` where its batch failed). The sampler's own code draws the noise, so image ``j`` of prompt
    ``p`` is the image the ``sample`` stage produced. Attend-and-Excite is refused: its pipeline replaces
    every attention processor, which would silently remove the capture.
    """
    if sampler.kind != "sd":
        raise ValueError(f"attention capture needs a plain SD sampler, got {sampler.kind!r}: the "
                         "Attend-and-Excite pipeline installs its own attention processors")
    try:  # a bad step is a config error, not a failure of every image
        resolve_steps(keep_steps, denoising_iterations(sampler.pipe, sampler.scale.num_inference_steps))
    except ValueError as err:
        raise ConfigError(f"profiles.<p>.attention_maps.steps: {err}") from err
    store = capture_cross_attention(sampler.pipe.unet, groups, detach=True)
    recording = RecordingPipe(sampler.pipe, store, keep_steps)
    try:
        rows = Sampler(recording, sampler.kind, sampler.cfg, sampler.scale, sampler.seed).rows(list(items))
    finally:
        restore_attention(sampler.pipe.unet)
    return rows, pair_records(rows, recording.records)


def pair_records(rows: Sequence[dict], records: Sequence[ImageAttention]) -> list[ImageAttention | None]:
    """One record per sampler row: rows whose sampling call raised (``sample_failed``) get None, the others
    take the records of the successful calls in order (the sampler calls in item order, retries included)."""
    sampled = [row["status"] != STATUS_FAILED for row in rows]
    if sum(sampled) != len(records):
        raise RuntimeError(f"recorded attention for {len(records)} images but sampled {sum(sampled)}")
    found = iter(records)
    return [next(found) if ok else None for ok in sampled]


def resolve_steps(steps: Sequence[int], num_steps: int) -> list[int]:
    """Step indices with negatives counted from the end (-1 = last step), checked against ``num_steps``."""
    out = []
    for s in steps:
        index = s + num_steps if s < 0 else s
        if not 0 <= index < num_steps:
            raise ValueError(f"denoising step {s} is outside 0..{num_steps - 1} ({num_steps} steps)")
        out.append(index)
    return sorted(dict.fromkeys(out))
