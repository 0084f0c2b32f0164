"""Embedded Stable Diffusion family: the real CLIP tokenizer, a tiny SD1.x and the SD1.4 architecture.

* ``tiny-sd``: a complete ``StableDiffusionPipeline`` folder (UNet, VAE, CLIP text encoder, tokenizer,
  PNDM scheduler) that runs on a CPU in milliseconds per step. Its UNet keeps SD1.x's block layout: three
  cross-attention down levels (2 transformer blocks each), a mid block (1), three cross-attention up
  levels (3 each) — 16 cross-attention layers at the same places as in SD1.4, 8 heads each — at latent
  size 16 (images of 128 px) instead of 64.
* ``sd14-random``: SD1.4's exact architecture (860M-parameter UNet, CLIP ViT-L/14 text encoder, VAE) with
  random weights, for fidelity and speed checks. Several GB: built on demand, never in the demo.
* The tokenizer of both is the real CLIP BPE tokenizer, built from the vocabulary that ``open_clip``
  ships, so token ids equal SD1.4's ("a photo of a cat" → 49406 320 1125 539 320 2368 49407).
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.zoo import register

TOKENIZER_MAX_LENGTH = 77
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"

# CompVis/stable-diffusion-v1-4 configs (unet/config.json, vae/config.json, text_encoder/config.json,
# scheduler/scheduler_config.json), restricted to the keys that define the architecture.
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD14_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
)
SD14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
SD14_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, trained_betas=None,
)

# The tiny model: same block types and layers per block, narrow channels, 8 heads, latent 16x16.
TINY_UNET = dict(
    SD14_UNET, sample_size=16, block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
    cross_attention_dim=32,
)
TINY_VAE = dict(SD14_VAE, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=128)
TINY_TEXT = dict(SD14_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's BPE vocabulary (49,408 entries) and merge list, from open_clip's packaged file.

    The construction is CLIP's: 256 byte symbols, the same with an end-of-word marker, one entry per
    merge (the first 48,894 merges of the file), then the two special tokens at 49406 and 49407.
    """
    import open_clip.tokenizer as oct

    path = Path(oct.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(oct.bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def save_clip_tokenizer(out_dir: Path) -> None:
    """Write SD1.4's CLIP tokenizer (vocab, merges, special tokens, max length 77) to ``out_dir``."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(
        str(vocab_file), str(merges_file), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN, model_max_length=TOKENIZER_MAX_LENGTH,
    )
    tok.save_pretrained(str(out_dir))


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The real CLIP tokenizer, built once per process through a temporary folder (for tests and text code)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as tmp:
        save_clip_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def build_sd_components(unet_cfg: dict, vae_cfg: dict, text_cfg: dict) -> dict:
    """UNet, VAE, text encoder and PNDM scheduler with random weights from the current torch RNG."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return dict(
        unet=UNet2DConditionModel(**unet_cfg),
        vae=AutoencoderKL(**vae_cfg),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)).eval(),
        scheduler=PNDMScheduler(**SD14_SCHEDULER),
    )


def save_sd_pipeline(out_dir: Path, components: dict) -> None:
    """Assemble a ``StableDiffusionPipeline`` (no safety checker) and ``save_pretrained`` it."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    save_clip_tokenizer(out_dir / "tokenizer")
    pipe = StableDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(str(out_dir / "tokenizer")), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, **components,
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)


def build_sd14_unet(seed: int) -> torch.nn.Module:
    """SD1.4's UNet architecture with seeded random weights (in memory; ~3.4 GB in fp32)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**SD14_UNET)


def calibrate_vae_scaling(vae: torch.nn.Module, image_size: int, num_images: int = 8) -> float:
    """Set ``vae.config.scaling_factor`` so latents of smooth random images have unit variance.

    SD1.4's factor 0.18215 was chosen the same way for its trained VAE (latents x factor ~ N(0, 1)); a
    random VAE needs its own, or the diffusion noise schedule would swamp its latents. Returns the factor.
    """
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(num_images, 3, 8, 8, generator=gen) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        std = float(vae.encode(images).latent_dist.mean.std())
    factor = 1.0 / std
    vae.register_to_config(scaling_factor=factor)
    return factor


@register("tiny-sd", "tiny Stable Diffusion 1.x (SD1.4 block layout, latent 16, real CLIP tokenizer)")
def build_tiny_sd(out_dir: Path, seed: int) -> None:
    components = build_sd_components(TINY_UNET, TINY_VAE, TINY_TEXT)
    calibrate_vae_scaling(components["vae"], TINY_VAE["sample_size"])
    save_sd_pipeline(out_dir, components)


@register("sd14-random", "Stable Diffusion 1.4 architecture with random weights (several GB)")
def build_sd14_random(out_dir: Path, seed: int) -> None:
    save_sd_pipeline(out_dir, build_sd_components(SD14_UNET, SD14_VAE, SD14_TEXT))
