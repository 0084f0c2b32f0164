"""Per-token cross-attention maps from captured attention, and how much of it falls inside an object mask.

The capture itself lives in :mod:`pipeline.attention` (``AttentionStore.maps[group]`` is a list with one
tensor of shape (batch, heads, H*W, tokens) per layer call). This module turns those lists into maps
a person can look at and a number that measures grounding:

* :func:`group_map` averages one resolution group over heads and layers → (batch, H*W, tokens);
* :func:`token_maps` picks token columns (summing the sub-tokens of a word) → (batch, K, h, w);
* :func:`upsample` / :func:`relative_to_mean` prepare maps for figures;
* :func:`grounding_share` is the share of a word's attention inside its mask, the quantity TokenCompose's
  token loss drives towards 1 (SPEC §1.4.2), computed here on head- and layer-averaged maps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.attention import capture_cross_attention, check_group_names, restore_attention, side_of
from pipeline.config import ConfigError, NonEmpty, PositiveInt, models_dir_of, section
from pipeline.figures import attention_grid
from pipeline.grounding import make_job
from pipeline.attention import mask_ratios
from pipeline.sampling import (
    STATUS_FAILED, EvalModel, EvalModelRef, SampleItem, Sampler, SamplingCfg, SamplingScale, eval_model,
    open_sampler,
)
from pipeline.runtime import rank_device
from pipeline.store.shards import STATUS_OK, iter_rows
from pipeline.store.codecs import image_from_bytes, rle_decode
from pipeline.text import CaptionTokens, align_phrase, locate_phrases

log = logging.getLogger(__name__)


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


DISPLAY_TOP = 4.0  # figures colour attention ÷ its image mean from 0 to this value (1 = uniform)
SCALE_LABEL = "attention ÷ its mean over the image (1 = uniform)"


def relative_to_mean(maps: torch.Tensor, top: float = DISPLAY_TOP) -> torch.Tensor:
    """Each (.., H, W) map divided by its mean over the image, then by ``top`` and clipped to [0, 1].

    One fixed scale for every map, model and step, so figures compare: a uniform map is 1/``top`` everywhere
    (no contrast stretched out of rounding noise), and a map whose attention sits on a quarter of the image
    reaches 1 there. Like the grounding share, it shows where a token's attention lies, not how much of the
    softmax the token takes. An all-zero map stays zero."""
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    ratio = torch.where(mean > 0, maps / mean.clamp_min(1e-30), torch.zeros_like(maps))
    return (ratio / top).clamp(0.0, 1.0)


def grounding_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's attention mass inside its mask: (K, h, w), (K, H, W) → (K,) in [0, 1].

    share_k = Σ_p A_k(p)·m_k(p) / Σ_p A_k(p) — the ratio of TokenCompose's token loss
    (:func:`pipeline.attention.mask_ratios`), here on head- and layer-averaged word maps and with m_k the
    mask **area-averaged** onto the map's grid (the fraction of each attention cell the object covers)
    rather than the training loss's dilating bilinear-then-``> 0`` resize. This equals the share at image
    resolution with each attention cell spread evenly over its pixels. A map with no mass gives NaN.
    """
    if maps.ndim != 3 or masks.ndim != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(f"expected (K, h, w) maps and (K, H, W) masks, got {tuple(maps.shape)} and "
                         f"{tuple(masks.shape)}")
    k, h, w = maps.shape
    if masks.shape[-2] % h or masks.shape[-1] % w:
        log.warning("mask size %s is not a multiple of the map size %s; cells are averaged approximately",
                    tuple(masks.shape[-2:]), (h, w))
    cover = F.adaptive_avg_pool2d(masks.float().unsqueeze(1), (h, w)).reshape(1, k, h * w)
    cols = maps.float().reshape(1, 1, 1, k, h * w).transpose(-1, -2).unsqueeze(-1)  # (L, B, heads, P, W, S)
    return mask_ratios(cols, cover).reshape(k)


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


def word_tokens(tokenizer, prompt: str) -> tuple[list[int], list[str]]:
    """Positions (SOT = 0) and labels of a prompt's word tokens: SOT, EOT and punctuation left out."""
    ids = tokenizer(prompt, truncation=True).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    positions, labels = [], []
    for pos, piece in enumerate(pieces[1:-1], start=1):
        label = piece.replace("</w>", "")
        if any(ch.isalnum() for ch in label):
            positions.append(pos)
            labels.append(label)
    return positions, labels


def figure_maps(record: ImageAttention, groups: Sequence[str], positions: Sequence[int],
                size: tuple[int, int]) -> np.ndarray:
    """(G, S, K, H, W) display maps of one image: per group, kept step and token, upsampled and scaled to [0, 1]
    by :func:`relative_to_mean`."""
    steps = sorted(record.steps)
    out = np.zeros((len(groups), len(steps), len(positions), *size), dtype=np.float32)
    for g, group in enumerate(groups):
        for s, step in enumerate(steps):
            maps = token_maps(record.steps[step][group][None], [[p] for p in positions])
            out[g, s] = relative_to_mean(upsample(maps, size))[0].numpy()
    return out


def image_shares(record: ImageAttention, groups: Sequence[str], token_lists: Sequence[Sequence[int]],
                 masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """group -> (K,) grounding shares of K words of one image, on its all-step mean maps; masks (K, H, W)."""
    return {g: grounding_share(token_maps(record.mean[g][None], token_lists)[0], masks) for g in groups}


def denoising_iterations(pipe, num_inference_steps: int) -> int:
    """Denoising iterations of a pipeline call (PNDM with ``skip_prk_steps`` runs one more than asked)."""
    pipe.scheduler.set_timesteps(num_inference_steps)
    return len(pipe.scheduler.timesteps)


def resolve_steps(steps: Sequence[int], num_steps: int) -> list[int]:
    """Step indices with negatives counted from the end (-1 = last step), checked against ``num_steps``."""
    out = []
    for s in steps:
        index = s + num_steps if s < 0 else s
        if not 0 <= index < num_steps:
            raise ValueError(f"denoising step {s} is outside 0..{num_steps - 1} ({num_steps} steps)")
        out.append(index)
    return sorted(dict.fromkeys(out))


# --- stages: figures and the grounding metric --------------------------------------------------------

@dataclass(frozen=True)
class AttentionMapsCfg:
    """Top-level ``attention_maps``: which resolution groups the figures show (one block of rows each)."""

    groups: Annotated[list[str], NonEmpty()]
    cell_size: PositiveInt  # pixels per cell of the figure (image and maps are resized to it)

    def __post_init__(self) -> None:
        check_group_names(self.groups)


@dataclass(frozen=True)
class AttentionMapsScale:
    """``profiles.<p>.attention_maps``: models (keys of ``eval_models``), prompts and denoising steps shown."""

    models: Annotated[list[str], NonEmpty()]
    prompts: Annotated[list[str], NonEmpty()]
    steps: Annotated[list[int], NonEmpty()]  # step indices; negative counts from the end (-1: the last step)


@dataclass(frozen=True)
class GroundingEvalCfg:
    """Top-level ``grounding_eval``: the groups whose attention share is measured."""

    groups: Annotated[list[str], NonEmpty()]

    def __post_init__(self) -> None:
        check_group_names(self.groups)


@dataclass(frozen=True)
class GroundingEvalScale:
    """``profiles.<p>.grounding_eval``: how many MultiGen images are regenerated with capture."""

    prompt_sets: Annotated[list[str], NonEmpty()]
    num_prompts: PositiveInt  # the first prompts of each set (the sampler's prompt ids)
    images_per_prompt: PositiveInt  # image indices 0..J-1 (the sampler's seeds)


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
    return open_sampler(ref, model, models_dir_of(params), cfg, scale, int(params["seed"]), rank_device()), ref


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


def write_attention_figures(sampler: Sampler, model: str, prompts: Sequence[str], groups: Sequence[str],
                            steps: Sequence[int], out_dir: Path, cell_size: int = 128) -> list[Path]:
    """``out_dir/<model>_<i>.png`` for every prompt ``i``: word-token rows, step columns, final image.

    Prompt ``i`` is sampled with the key ("attention_maps", i, 0), so every model starts from the same noise.
    Returns the written paths; a prompt whose sampling failed is logged and has no figure.
    """
    items = [SampleItem("attention_maps", i, 0, text, ()) for i, text in enumerate(prompts)]
    rows, records = sample_with_attention(sampler, items, groups, steps)
    written = []
    for i, (row, record) in enumerate(zip(rows, records)):
        if row["status"] != STATUS_OK or record is None:
            log.error("%s prompt %d (%r): no figure, sampling failed: %s", model, i, prompts[i], row["error"])
            continue
        image = image_from_bytes(row["image"]).resize((cell_size, cell_size), Image.Resampling.BICUBIC)
        positions, labels = word_tokens(sampler.pipe.tokenizer, prompts[i])
        maps = figure_maps(record, groups, positions, (cell_size, cell_size))
        step_labels = [f"step {s} (t={record.timesteps[s]})" for s in sorted(record.steps)]
        path = Path(out_dir) / f"{model}_{i}.png"
        path.write_bytes(attention_grid(np.asarray(image), maps, groups, step_labels, labels,
                                        f"{model}: {prompts[i]}", colour_scale=(DISPLAY_TOP, SCALE_LABEL)))
        written.append(path)
    return written


def category_tokens(tokenizer, prompt: str, objects: Sequence[str], caption_id: str = "?"):
    """Each object's CLIP token positions (all its sub-tokens, as TokenCompose supervises them).

    Uses :func:`pipeline.text.align_phrase` at the object's own character position in the prompt.
    Returns (indices, statuses, errors), one entry per object; ``[]`` indices where alignment failed.
    """
    tokens = CaptionTokens.of(tokenizer, prompt)
    aligned = [align_phrase(tokenizer, tokens, name, start, caption_id=caption_id)
               for name, start in zip(objects, locate_phrases(prompt, objects))]
    return [a.indices for a in aligned], [a.status for a in aligned], [a.error for a in aligned]


def grounding_rows(sampler: Sampler, grounder: Any, items: Sequence[SampleItem],
                   groups: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Regenerate MultiGen images with capture, segment their categories, measure attention shares.

    Args:
        sampler: :class:`pipeline.sampling.Sampler` of the model (plain SD).
        grounder: :class:`pipeline.grounding.Grounder` (Grounded-SAM) run on the generated images.
        items: :class:`pipeline.sampling.SampleItem` list (``prompt_items``: the ``sample`` stage's keys,
            hence its seeds).
        groups: resolution groups to measure.

    Returns:
        (rows, samples): one row per (image, category) with ``image_id``, ``phrase``, ``token_indices``,
        ``status``/``error`` (Grounded-SAM's reason codes), ``mask_area`` and ``share_<group>`` (NaN unless
        ``status == "ok"``); and the sampler's rows of the regenerated images.
    """
    samples, records = sample_with_attention(sampler, items, groups)
    jobs, by_id = [], {}
    for item, sample, record in zip(items, samples, records):
        image_id = f"{item.promptset}/{item.prompt_id}_{item.image_index}"
        indices, status, errors = category_tokens(sampler.pipe.tokenizer, item.text, item.objects, image_id)
        nouns = dict(image_id=image_id, caption=item.text, phrases=list(item.objects), token_indices=indices,
                     phrase_status=status, phrase_error=errors)
        ok = sample["status"] == STATUS_OK
        jobs.append(make_job(nouns, image_from_bytes(sample["image"]) if ok else None,
                             STATUS_OK if ok else "missing_image", "" if ok else sample["error"]))
        by_id[image_id] = record
    rows = []
    for found in grounder.run(jobs):
        row = {k: found[k] for k in ("image_id", "phrase", "token_indices", "status", "error")}
        row.update({"mask_area": math.nan, **{f"share_{g}": math.nan for g in groups}})
        if found["status"] == STATUS_OK:
            mask = torch.from_numpy(rle_decode(found["mask"]))[None]
            row["mask_area"] = float(mask.float().mean())
            shares = image_shares(by_id[found["image_id"]], groups, [found["token_indices"]], mask)
            row.update({f"share_{g}": float(v[0]) for g, v in shares.items()})
        rows.append(row)
    return rows, samples


def summarize_grounding(rows: Sequence[dict], groups: Sequence[str]) -> dict:
    """Flat metrics: mean share per group over scored (image, category) pairs, their mean, counts by status.

    ``mask_area_mean`` is the share a spatially uniform attention map would get (the chance level).
    """
    table = pd.DataFrame(list(rows), columns=["status", "mask_area", *[f"share_{g}" for g in groups]])
    scored = table[table["status"] == STATUS_OK]
    out: dict = {"categories": int(len(table)), "categories_scored": int(len(scored))}
    out.update({f"status_{k}": int(v) for k, v in table["status"].value_counts().items()})
    for g in groups:
        out[f"share_{g}"] = float(scored[f"share_{g}"].mean()) if len(scored) else math.nan
    values = [out[f"share_{g}"] for g in groups]
    out["share_mean"] = float(np.mean(values)) if values and len(scored) else math.nan
    out["mask_area_mean"] = float(scored["mask_area"].mean()) if len(scored) else math.nan
    return out


GROUNDING_FAILURES = ("inference_failed", "missing_image")  # Grounded-SAM raised; the image was not generated


def grounding_failures(summary: dict) -> int:
    """Categories of a :func:`summarize_grounding` summary that failed rather than found nothing."""
    return sum(summary.get(f"status_{s}", 0) for s in GROUNDING_FAILURES)


def compare_with_samples(samples_dir: Path, samples: Sequence[dict], items: Sequence[SampleItem]) -> dict:
    """How the regenerated images compare with the ``sample`` stage's images of the same keys.

    Returns ``images_compared``, ``images_identical`` and ``max_pixel_diff`` (0-255); zeros and a
    logged note when the sample shards are absent.
    """
    if not Path(samples_dir).is_dir():
        log.warning("%s absent: regenerated images not compared with the sample stage's", samples_dir)
        return {"images_compared": 0, "images_identical": 0, "max_pixel_diff": None}
    wanted = {(item.prompt_id, item.image_index) for item in items}
    stored = {(r["prompt_id"], r["image_index"]): r["image"] for r in
              iter_rows(Path(samples_dir), columns=["prompt_id", "image_index", "image", "status"])
              if r["status"] == STATUS_OK and (r["prompt_id"], r["image_index"]) in wanted}
    compared = identical = 0
    worst = 0
    for item, sample in zip(items, samples):
        ref = stored.get((item.prompt_id, item.image_index))
        if ref is None or sample["status"] != STATUS_OK:
            continue
        a = np.asarray(image_from_bytes(sample["image"]), dtype=np.int16)
        b = np.asarray(image_from_bytes(ref), dtype=np.int16)
        diff = int(np.abs(a - b).max()) if a.shape == b.shape else 255
        compared, identical, worst = compared + 1, identical + (diff == 0), max(worst, diff)
    return {"images_compared": compared, "images_identical": identical,
            "max_pixel_diff": worst if compared else None}
