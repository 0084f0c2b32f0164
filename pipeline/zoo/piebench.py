"""Embedded models for the PIE-Bench metrics: a tiny DINO ViT and a tiny open_clip CLIP.

* ``tiny-dino``: a ``transformers`` ``ViTModel`` with DINO ViT-B/8's patch size (8) and input size (224,
  so 1 + 28·28 = 785 tokens), 2 blocks of width 32 and 4 heads, random weights. Loaded exactly like
  ``facebook/dino-vitb8`` (``ViTModel.from_pretrained``), so the structure-distance code path is the
  real one.
* ``tiny-openclip``: an ``open_clip`` ``CLIP`` from a small custom config (ViT image tower at 64 px, text
  tower over the real CLIP vocabulary of 49,408 tokens and context 77), random weights, written as
  ``open_clip_config.json`` + ``open_clip_model.safetensors`` so ``open_clip`` loads it with the
  ``local-dir:`` schema, the same way as a downloaded ``hf-hub:`` model.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.zoo import register

TINY_DINO = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8,
    image_size=224, num_channels=3, qkv_bias=True,
)

TINY_OPENCLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=64, layers=2, width=32, head_width=16, patch_size=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
)
# open_clip's preprocessing for OpenAI CLIP: bicubic resize of the shortest side, centre crop, CLIP stats.
OPENAI_PREPROCESS = dict(
    mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711],
    interpolation="bicubic", resize_mode="shortest",
)


@register("tiny-dino", "tiny DINO-style ViT (patch 8, 224 px input, 2 blocks) for the structure distance")
def build_tiny_dino(out_dir: Path, seed: int) -> None:
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(**TINY_DINO), add_pooling_layer=False).eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)


@register("tiny-openclip", "tiny open_clip CLIP (real CLIP vocabulary, 64 px ViT) for CLIP similarity")
def build_tiny_openclip(out_dir: Path, seed: int) -> None:
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    model = CLIP(**TINY_OPENCLIP).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(out_dir) / "open_clip_model.safetensors"))
    config = {"model_cfg": TINY_OPENCLIP, "preprocess_cfg": OPENAI_PREPROCESS}
    (Path(out_dir) / "open_clip_config.json").write_text(json.dumps(config, indent=1) + "\n")
