"""Embedded models of the MultiGen and VISOR evaluations: tiny OWL detectors and stand-in fine-tuned UNets.

* ``tiny-owlv2``: an ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` folder built from small
  ``Owlv2Config``s (96 px input, 16 px patches -> 36 boxes per image). Its tokenizer is SD1.4's CLIP BPE
  tokenizer set up as OWLv2's is (pad token ``!`` = id 0, 16-token queries). OWL models ignore a query whose
  first token id is 0, so the special tokens sit at the end of the vocabulary, as in real CLIP.
* ``tiny-owlvit``: the same sizes as an ``OwlViTForObjectDetection`` + ``OwlViTProcessor`` (OWL-ViT v1, the
  VISOR detector; its processor resizes to the square input without padding).
* ``tiny-sd-unet-a`` / ``tiny-sd-unet-b``: bare ``UNet2DConditionModel`` folders with ``tiny-sd``'s
  architecture and weights from other seeds. They stand in for the released TokenCompose checkpoints
  (``mlpc-lab/TokenCompose_SD14_A`` / ``_B``) in the demo: they exercise the same UNet-swap loading path
  (``pipeline.models.load_sd_pipeline(..., unet_ref=...)``) but are NOT those checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.seeding import derive_seed
from pipeline.zoo import register
from pipeline.zoo.sd import TINY_UNET, save_clip_tokenizer

OWL_QUERY_LENGTH = 16  # OWL-ViT / OWLv2 text context (max_position_embeddings)
OWL_PAD_TOKEN = "!"    # id 0 in CLIP's vocabulary, OWL's padding token

TINY_OWL_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=OWL_QUERY_LENGTH)
TINY_OWL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=96, patch_size=16)
TINY_OWL_PROJECTION = 32


def _owl_classes(version: int) -> tuple[type, type, type, type]:
    """(config, model, image processor, processor) classes of OWLv2 (``version`` 2) or OWL-ViT (1)."""
    import transformers as tf

    if version == 2:
        return tf.Owlv2Config, tf.Owlv2ForObjectDetection, tf.Owlv2ImageProcessor, tf.Owlv2Processor
    return tf.OwlViTConfig, tf.OwlViTForObjectDetection, tf.OwlViTImageProcessor, tf.OwlViTProcessor


def save_owl_processor(out_dir: Path, image_size: int, version: int = 2) -> None:
    """Write an OWLv2 (``version`` 2) or OWL-ViT (1) processor: CLIP tokenizer with OWL's padding, square
    ``image_size`` input."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    save_clip_tokenizer(out_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir), pad_token=OWL_PAD_TOKEN,
                                              model_max_length=OWL_QUERY_LENGTH)
    if tokenizer.pad_token_id != 0 or tokenizer.bos_token_id != 49406:
        raise RuntimeError("tiny OWL detector: CLIP vocabulary has unexpected special-token ids")
    square = {"height": image_size, "width": image_size}
    _, _, image_processor_cls, processor_cls = _owl_classes(version)
    image_processor = image_processor_cls(size=square) if version == 2 else image_processor_cls(
        size=square, crop_size=square)
    processor_cls(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out_dir))


def _build_tiny_owl(out_dir: Path, version: int) -> None:
    """A tiny OWLv2 or OWL-ViT detector (random weights from the forked global RNG) and its processor."""
    config_cls, model_cls, _, _ = _owl_classes(version)
    config = config_cls(text_config=TINY_OWL_TEXT, vision_config=TINY_OWL_VISION, projection_dim=TINY_OWL_PROJECTION)
    model_cls(config).eval().save_pretrained(str(out_dir), safe_serialization=True)
    save_owl_processor(out_dir, TINY_OWL_VISION["image_size"], version)


@register("tiny-owlv2", "tiny OWLv2 open-vocabulary detector (96 px, 36 boxes, CLIP tokenizer)")
def build_tiny_owlv2(out_dir: Path, seed: int) -> None:
    _build_tiny_owl(out_dir, version=2)


@register("tiny-owlvit", "tiny OWL-ViT (v1) open-vocabulary detector, VISOR's family (96 px, 36 boxes)")
def build_tiny_owlvit(out_dir: Path, seed: int) -> None:
    _build_tiny_owl(out_dir, version=1)


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
