"""The images to sample: one item per (prompt set, prompt, image index), each with its own seeded generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.datasets.multigen_files import MultiGenPrompt
from pipeline.seeding import torch_generator


@dataclass(frozen=True)
class SampleItem:
    """One image to sample: image ``image_index`` of prompt ``prompt_id`` of ``promptset``."""

    promptset: str
    prompt_id: int
    image_index: int
    text: str
    objects: tuple[str, ...]


def image_generator(seed: int, item: SampleItem) -> torch.Generator:
    """The CPU generator of one image, seeded from (seed, "multigen", prompt set, prompt id, image index)."""
    return torch_generator(seed, "multigen", item.promptset, item.prompt_id, item.image_index)


def prompt_items(promptset: str, prompts: Sequence[MultiGenPrompt], images_per_prompt: int) -> list[SampleItem]:
    """All (prompt, image index) items of a prompt set, prompt-major, image indices 0..J-1."""
    return [SampleItem(promptset, p.prompt_id, j, p.text, p.objects)
            for p in prompts for j in range(images_per_prompt)]
