"""CLIP score of an image against a text with an open_clip model: ``max(100 · cos(image, text), 0)``.

The convention of torchmetrics' ``CLIPScore`` and of PIE-Bench's evaluation (SPEC §5.4): cosine similarity of
the L2-normalised image and text embeddings, times 100, clipped at 0. PIE-Bench's CLIP columns and the
photorealism stages' CLIP score (``fid@<model>``: generated image against its caption) both use it, with
OpenAI's ViT-L/14 in the paper profile (``ViT-L-14:openai``) and a tiny embedded open_clip in the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.clip_ref import CLIP_REF_FORMS
from pipeline.config import ConfigError
from pipeline.models import ModelLoadError, parse_ref, resolve


def open_clip_name(ref: str, models_dir: str | Path) -> tuple[str, str | None]:
    """(model name, pretrained tag) for ``open_clip.create_model_and_transforms``.

    ``embedded:NAME`` and local folders → ``local-dir:PATH``; ``hf-hub:ORG/REPO`` as is;
    ``ARCH:TAG`` (``ViT-L-14:openai``) → (ARCH, TAG).
    """
    if ref.startswith("embedded:"):
        parse_ref(ref)
        return f"local-dir:{resolve(ref, models_dir)}", None
    if ref.startswith(("hf-hub:", "local-dir:")):
        return ref, None
    if Path(ref).is_dir():
        return f"local-dir:{ref}", None
    if ":" in ref:
        arch, tag = ref.rsplit(":", 1)
        return arch, tag
    raise ConfigError(CLIP_REF_FORMS.format(ref=ref))


def trained_with_quick_gelu(name: str, tag: str | None) -> bool:
    """Whether open_clip's pretrained tag was trained with QuickGELU (``ViT-L-14:openai`` was).

    open_clip's built-in ``ViT-L-14`` config uses plain GELU and only warns when ``openai`` weights are
    loaded into it; without forcing QuickGELU the scorer would not be OpenAI's CLIP.
    """
    import open_clip

    return bool(tag and open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))


class ClipSimilarity:
    """CLIP score ``max(100 · cos(image, text), 0)`` with an open_clip model and its own preprocessing."""

    def __init__(self, model, preprocess, tokenizer, device: str | torch.device = "cpu"):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.device = torch.device(device)

    @classmethod
    def load(cls, ref: str, models_dir: str | Path, device: str | torch.device = "cpu"):
        """Load an open_clip model by reference (see :func:`open_clip_name`)."""
        import open_clip

        name, tag = open_clip_name(ref, models_dir)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=tag, force_quick_gelu=trained_with_quick_gelu(name, tag))
        except (OSError, RuntimeError, ValueError) as err:
            raise ModelLoadError(f"could not load CLIP model {ref!r} ({name}, {tag}): {err}; download it once "
                                 f"where there is network (HF_HOME cache) or give a local open_clip folder") from err
        return cls(model, preprocess, open_clip.get_tokenizer(name), device)

    @torch.no_grad()
    def cosines(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """(N,) cosine similarities of the CLIP embeddings of N (H, W, 3) uint8 images and their N texts,
        in one batch (images may differ in size: each is preprocessed on its own)."""
        if len(images) != len(texts):
            raise ValueError(f"CLIP score: {len(images)} images but {len(texts)} texts")
        if not len(images):
            return np.zeros(0)
        pixels = torch.stack([self.preprocess(Image.fromarray(np.asarray(im, np.uint8))) for im in images])
        img = self.model.encode_image(pixels.to(self.device)).float()
        txt = self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float()
        return torch.nn.functional.cosine_similarity(img, txt, dim=-1).cpu().double().numpy()

    def cosine(self, image: np.ndarray, text: str) -> float:
        """Cosine similarity of the CLIP embeddings of an (H, W, 3) uint8 image and ``text``."""
        return float(self.cosines([image], [text])[0])

    def scores(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """(N,) CLIP scores ``max(100 · cos, 0)`` of N (H, W, 3) uint8 images against their N texts."""
        return np.maximum(100.0 * self.cosines(images, texts), 0.0)

    def __call__(self, image: np.ndarray, text: str) -> float:
        """CLIP score of an (H, W, 3) uint8 image against ``text``: ``max(100 · cos, 0)``."""
        return float(self.scores([image], [text])[0])
