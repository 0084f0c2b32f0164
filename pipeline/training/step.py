"""One training step's computation: the models, VAE/text encoding and the TokenCompose loss (SPEC §1.5).

L = L_denoise + token_weight · L_token + pixel_weight · L_pixel, with L_denoise the MSE between the UNet's
prediction and the noise (or velocity) of a DDPM forward process, and the grounding losses of
:mod:`pipeline.training.losses` on cross-attention maps captured by :mod:`pipeline.attention` in the same
forward. The VAE and text encoder are frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pipeline.attention import AttentionStore
from pipeline.config import ConfigError
from pipeline.models import from_pretrained
from pipeline.training.losses import GroundingLoss, GroundingTargets, LossCfg, grounding_loss


@dataclass
class SDModels:
    """The components training needs (UNet trained; VAE and text encoder frozen)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_scheduler: Any


def load_models(sd_model: str, models_dir: Path) -> SDModels:
    """Load the Stable Diffusion components of ``sd_model`` (hub id, local folder or ``embedded:NAME``).

    The noise scheduler is a ``DDPMScheduler`` built from the model's scheduler config, as in the original.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    get = lambda cls, sub: from_pretrained(cls, sd_model, models_dir, subfolder=sub)  # noqa: E731
    vae, text_encoder = get(AutoencoderKL, "vae"), get(CLIPTextModel, "text_encoder")
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    return SDModels(get(UNet2DConditionModel, "unet"), vae, text_encoder, get(CLIPTokenizer, "tokenizer"),
                    get(DDPMScheduler, "scheduler"))


@dataclass
class StepLosses:
    """Losses of one micro-batch: total (weighted), denoise, and the grounding part (None if not captured)."""

    total: torch.Tensor
    denoise: torch.Tensor
    grounding: GroundingLoss | None


class LatentCache:
    """The VAE posterior of each training image, so each image is encoded once per run instead of every step.

    Training images are resized and center-cropped deterministically, so the encoder's output for an image
    never changes; only the posterior sample does. The cache keeps ``latent_dist.parameters`` (2C, h, w),
    mean and log-variance, per image id on the CPU in the VAE's dtype (SD1.4 at 512 px: 128 KiB per image
    in fp32). :meth:`posterior` rebuilds the batch's distribution, and sampling it draws from the step's
    generator exactly as a fresh encode would (same shape, same order): training is unchanged up to the
    float rounding of batched kernels. Images are encoded one at a time, so a resumed run rebuilds exactly
    the cache the interrupted one had (resume stays bit-identical on CPU).
    """

    def __init__(self) -> None:
        self.parameters: dict[str, torch.Tensor] = {}
        self.encoded = 0  # images run through the encoder

    @torch.no_grad()
    def posterior(self, vae: torch.nn.Module, pixel_values: torch.Tensor, image_ids: Sequence[str]):
        """The VAE posterior of (B, 3, R, R) ``pixel_values``, encoding only the images not seen before."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        missing = [i for i, key in enumerate(image_ids) if key not in self.parameters]
        for i in missing:  # one at a time: an image's entry never depends on the batch it first came in
            image = pixel_values[i : i + 1].to(vae.device, vae.dtype)
            self.parameters[image_ids[i]] = vae.encode(image).latent_dist.parameters[0].to("cpu", copy=True)
        self.encoded += len(missing)
        stacked = torch.stack([self.parameters[key] for key in image_ids]).to(vae.device)
        return DiagonalGaussianDistribution(stacked)


@torch.no_grad()
def encode_batch(models: SDModels, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 generator: torch.Generator, cache: LatentCache | None = None,
                 image_ids: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, R, R) images, (B, 77) ids -> latents (B, 4, R/8, R/8) float32 and text states (B, 77, D) float32.

    Latents are a sample of the VAE posterior times the VAE's ``scaling_factor``; with a ``cache`` the
    posterior of images seen before (by ``image_ids``) comes from it instead of the encoder.
    """
    vae, text = models.vae, models.text_encoder
    if cache is None:
        dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    else:
        dist = cache.posterior(vae, pixel_values, image_ids)
    latents = dist.sample(generator=generator).float() * vae.config.scaling_factor
    states = text(input_ids.to(text.device))[0].float()
    return latents, states


def compute_losses(unet: torch.nn.Module, noise_scheduler: Any, latents: torch.Tensor, text_states: torch.Tensor,
                   targets: GroundingTargets, store: AttentionStore | None, loss_cfg: LossCfg,
                   generator: torch.Generator) -> StepLosses:
    """One UNet forward on noised ``latents`` (B, 4, h, w) and the weighted TokenCompose loss.

    Noise ~ N(0, I) and t ~ U{0, …, T-1} per sample come from ``generator`` (CPU draws, then moved).
    With a ``store`` (capturing ``loss_cfg.layers``) the grounding losses are added; their maps must carry
    gradient when autograd is on (non-reentrant checkpointing), which is checked.
    """
    b, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    steps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    target = _target(noise_scheduler, latents, noise, steps)
    if store is not None:
        store.reset()
    pred = unet(noise_scheduler.add_noise(latents, noise, steps), steps, text_states).sample
    denoise = F.mse_loss(pred.float(), target.float())
    if store is None:
        return StepLosses(denoise, denoise, None)
    _check_grad(store)
    ground = grounding_loss(store.maps, targets, loss_cfg.layers)
    total = denoise + loss_cfg.token_weight * ground.token + loss_cfg.pixel_weight * ground.pixel
    return StepLosses(total, denoise, ground)


def _target(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The denoising target: the noise (``epsilon``) or the velocity (``v_prediction``), shaped as ``latents``."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, steps)
    raise ConfigError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def _check_grad(store: AttentionStore) -> None:
    """Raise when autograd is on but a captured map carries no gradient (the grounding losses would be 0)."""
    if not torch.is_grad_enabled():
        return
    for group, maps in store.maps.items():
        if any(not m.requires_grad for m in maps):
            raise RuntimeError(
                f"captured cross-attention maps of {group} carry no gradient: the grounding losses would be "
                "silently zero. Use non-reentrant gradient checkpointing (diffusers' default) and do not "
                "capture with detach=True for training")


def needs_capture(loss_cfg: LossCfg) -> bool:
    """Whether the grounding losses take part (a weight > 0 and at least one layer group)."""
    return bool(loss_cfg.layers) and (loss_cfg.token_weight > 0 or loss_cfg.pixel_weight > 0)


def check_finite(values: dict[str, float], step: int, image_ids: Sequence[str]) -> None:
    """Stop with a clear error when the loss is NaN or infinite (names the step, the parts and the images).

    ``values`` are a micro-step's losses as floats (``loss``, ``denoise``, optionally ``token``, ``pixel``).
    Called before the optimizer step, so the weights never take a non-finite update.
    """
    if math.isfinite(values["loss"]):
        return
    parts = ", ".join(f"{k}={values[k]}" for k in ("denoise", "token", "pixel") if k in values)
    raise FloatingPointError(
        f"non-finite loss at optimizer step {step} ({parts}) on images {list(image_ids)}; check these images' "
        "masks, lower optim.lr, or use mixed_precision bf16 instead of fp16")
