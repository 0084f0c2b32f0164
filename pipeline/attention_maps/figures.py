"""Stage ``attention_maps``: per-token cross-attention figures across denoising steps, same seed for every model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.attention import check_group_names
from pipeline.attention_maps.recording import ImageAttention, sample_with_attention, token_maps, upsample
from pipeline.config import NonEmpty, PositiveInt
from pipeline.figures import attention_grid
from pipeline.sampling.items import SampleItem
from pipeline.sampling.sampler import Sampler
from pipeline.store.codecs import image_from_bytes
from pipeline.store.shards import STATUS_OK

log = logging.getLogger(__name__)


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
