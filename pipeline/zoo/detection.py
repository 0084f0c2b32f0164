"""Embedded models of the MultiGen evaluation: a tiny OWLv2 detector and stand-in fine-tuned UNets.

* ``tiny-owlv2``: an ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` folder built from small
  ``Owlv2Config``s (96 px input, 16 px patches -> 36 boxes per image). Its tokenizer is SD1.4's CLIP BPE
  tokenizer set up as OWLv2's is (pad token ``!`` = id 0, 16-token queries). OWL models ignore a query whose
  first token id is 0, so the special tokens sit at the end of the vocabulary, as in real CLIP.
* ``tiny-sd-unet-a`` / ``tiny-sd-unet-b``: bare ``UNet2DConditionModel`` folders with ``tiny-sd``'s
  architecture and weights from other seeds. They stand in for the released TokenCompose checkpoints
  (``mlpc-lab/TokenCompose_SD14_A`` / ``_B``) in the demo: they exercise the same UNet-swap loading path
  (``pipeline.models.load_sd_pipeline(..., unet_ref=...)``) but are NOT those checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..seeding import derive_seed
from . import register
from .sd import TINY_UNET, save_clip_tokenizer

OWL_QUERY_LENGTH = 16  # OWL-ViT / OWLv2 text context (max_position_embeddings)
OWL_PAD_TOKEN = "!"    # id 0 in CLIP's vocabulary, OWL's padding token

TINY_OWL_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=OWL_QUERY_LENGTH)
TINY_OWL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=96, patch_size=16)
TINY_OWL_PROJECTION = 32


def save_owl_processor(out_dir: Path, image_size: int) -> None:
    """Write an ``Owlv2Processor`` (CLIP tokenizer with OWL's padding, square ``image_size`` input)."""
    from transformers import CLIPTokenizer, Owlv2ImageProcessor, Owlv2Processor

    out_dir = Path(out_dir)
    save_clip_tokenizer(out_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir), pad_token=OWL_PAD_TOKEN,
                                              model_max_length=OWL_QUERY_LENGTH)
    if tokenizer.pad_token_id != 0 or tokenizer.bos_token_id != 49406:
        raise RuntimeError("tiny-owlv2: CLIP vocabulary has unexpected special-token ids")
    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out_dir))


@register("tiny-owlv2", "tiny OWLv2 open-vocabulary detector (96 px, 36 boxes, CLIP tokenizer)")
def build_tiny_owlv2(out_dir: Path, seed: int) -> None:
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    config = Owlv2Config(text_config=TINY_OWL_TEXT, vision_config=TINY_OWL_VISION,
                         projection_dim=TINY_OWL_PROJECTION)
    model = Owlv2ForObjectDetection(config).eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_owl_processor(out_dir, TINY_OWL_VISION["image_size"])


def _build_standin_unet(out_dir: Path, seed: int, name: str) -> None:
    """A ``tiny-sd``-shaped UNet with weights from a seed derived from (``seed``, ``name``)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, name))
        unet = UNet2DConditionModel(**TINY_UNET)
    unet.save_pretrained(str(out_dir), safe_serialization=True)


@register("tiny-sd-unet-a", "stand-in for mlpc-lab/TokenCompose_SD14_A: tiny-sd UNet, other seed (demo only)")
def build_tiny_sd_unet_a(out_dir: Path, seed: int) -> None:
    _build_standin_unet(out_dir, seed, "tiny-sd-unet-a")


@register("tiny-sd-unet-b", "stand-in for mlpc-lab/TokenCompose_SD14_B: tiny-sd UNet, other seed (demo only)")
def build_tiny_sd_unet_b(out_dir: Path, seed: int) -> None:
    _build_standin_unet(out_dir, seed, "tiny-sd-unet-b")
