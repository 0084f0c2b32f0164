"""Blended Latent Diffusion (SPEC §4) on a Stable Diffusion 1.x backbone.

Default semantics are those of the SD script and its PIE-Bench port (SPEC §4.1-4.2):

1. source image resized to the model's resolution (bilinear), VAE **posterior mean** × scaling factor;
2. mask resized to the latent size with PIL NEAREST and binarised at 0.5 (1 = region to edit);
3. a fresh DDIM scheduler (scaled-linear 0.00085-0.012, no clipping, ``set_alpha_to_one=False``,
   ``steps_offset 0``, "leading" spacing): 50 steps give t = 980, 960, ..., 0;
4. the loop runs over ``timesteps[int(steps · blending_start):]`` (t = 740 ... 0 for 50 steps and 0.25)
   starting from **pure noise**;
5. each step: classifier-free guidance (empty-string unconditional), DDIM step (η = 0), then blend with the
   source noised to the **current** t: z ← z ⊙ m + add_noise(z_src, ε, t) ⊙ (1 − m);
6. decode z / scaling factor, (x / 2 + 0.5) clamped, × 255 rounded to uint8.

Documented variants (params ``editing.init`` and ``editing.blend``):

* ``init: noised_source``: the study's description ("source noised in one step"). The SD script never
  does that; the SDXL script and the LDM code noise the source in one step to the **first kept timestep**
  (here 740 for 50 steps, not the 750 of the description, which is not on the DDIM grid), and so does
  this variant.
* ``blend: before_step``: the LDM implementation's order (SPEC §4.4): blend with the source noised to t,
  then denoise; the last denoising step is not followed by a blend.

Randomness: every image has its own CPU generator seeded from (global seed, ``"bld"``, image id), so an
image's edit does not depend on its batch or rank, and both backbones see the same noise. Draw order per
image: first the initial noise (also the noise of ``noised_source``), then one draw per loop step for the
background.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.config import Bounds, DtypeName, Fraction, NonNegativeInt, PositiveInt
from pipeline.eval_models import Backbone
from pipeline.models import component_hashes
from pipeline.seeding import derive_seed, standard_normal
from pipeline.store.batches import error_text, run_batches
from pipeline.store.codecs import png_bytes
from pipeline.store.identity import dir_files, files_digest
from pipeline.store.shards import STATUS_OK

log = logging.getLogger(__name__)

STATUS_BAD_INPUT = "bad_input"  # the source image or mask could not be loaded (not retried)
STATUS_EDIT_FAILED = "edit_failed"  # the edit raised (e.g. out of memory): a rerun tries it again

# The BLD SD script's scheduler (SPEC §4.1); all other keys at diffusers' defaults (steps_offset 0,
# "leading" spacing, 1000 training steps, epsilon prediction).
BLD_DDIM_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=0, timestep_spacing="leading", num_train_timesteps=1000,
)
SEED_KEY = "bld"


@dataclass(frozen=True)
class EditingCfg:
    """Params section ``editing`` (method hyperparameters, identical in every profile)."""

    guidance_scale: float = 7.5
    blending_start: float = 0.25  # fraction of the DDIM steps skipped at the noisy end
    init: Literal["noise", "noised_source"] = "noise"
    blend: Literal["after_step", "before_step"] = "after_step"
    mask_threshold: Annotated[float, Bounds(low=0, high=1, open_low=True)] = 0.5
    max_failed_rate: Fraction = 0.01  # the edit stage fails when more edits than this failed (not in the fingerprint)
    seeds: Literal["per_image", "same"] = "per_image"  # per_image: seeded per image id; same: every image from same_seed
    same_seed: NonNegativeInt = 1234  # seeds: same; the PIE-Bench editing scripts call setup_seed(1234) before each image

    def __post_init__(self) -> None:
        if self.init not in ("noise", "noised_source"):
            raise ValueError(f"init must be 'noise' or 'noised_source', got {self.init!r}")
        if self.blend not in ("after_step", "before_step"):
            raise ValueError(f"blend must be 'after_step' or 'before_step', got {self.blend!r}")
        if not 0.0 <= self.blending_start < 1.0:
            raise ValueError(f"blending_start must be in [0, 1), got {self.blending_start}")


@dataclass(frozen=True)
class EditingScale:
    """Params section ``profiles.<p>.editing`` (scale-bound values)."""

    num_inference_steps: PositiveInt = 50
    batch_size: PositiveInt = 4
    shard_size: PositiveInt = 16
    dtype: DtypeName = "auto"  # auto: float16 on CUDA (the BLD scripts' fp16), float32 on CPU


@dataclass(frozen=True)
class EditItem:
    """One edit request. ``image``: RGB PIL image; ``mask``: (H, W) array, nonzero = region to edit."""

    image_id: str
    image: Image.Image
    mask: np.ndarray
    prompt: str


# --- building blocks -------------------------------------------------------------------------------

def bld_scheduler(prediction_type: str = "epsilon"):
    """A fresh ``DDIMScheduler`` with the BLD script's configuration (SPEC §4.1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**BLD_DDIM_CONFIG, prediction_type=prediction_type)


def blend_timesteps(scheduler, num_inference_steps: int, blending_start: float) -> torch.Tensor:
    """The loop's timesteps: ``timesteps[int(steps · blending_start):]`` (740 ... 0 for 50 and 0.25)."""
    if not 0.0 <= blending_start < 1.0:
        raise ValueError(f"blending_start must be in [0, 1), got {blending_start}")
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps[int(num_inference_steps * blending_start):]


def source_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image → bilinear resize to (size, size) → (3, size, size) float in [-1, 1]."""
    image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def latent_mask(mask: np.ndarray, latent_size: int, threshold: float = 0.5) -> torch.Tensor:
    """(H, W) mask with values in {0, 1} (bool, int or float) → (1, h, w) float {0, 1} at the latent size.

    PIL NEAREST resize straight from the mask's size, then ``>= threshold`` (SPEC §4.2). NEAREST from
    512 to 64 (or 128 to 16) samples pixels 8i + 4, so PIE-Bench's forced 1-pixel border never reaches
    the latent mask.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"mask must be a non-empty (H, W) array, got shape {arr.shape}")
    arr = arr.astype(np.float32 if np.issubdtype(arr.dtype, np.floating) else np.uint8)
    small = Image.fromarray(arr).resize((latent_size, latent_size), Image.NEAREST)
    out = (np.asarray(small, dtype=np.float32) >= threshold).astype(np.float32)
    return torch.from_numpy(out)[None]


@torch.no_grad()
def encode_source(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → VAE posterior mean × scaling factor, (B, 4, H/8, W/8)."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """(B, 4, h, w) latents → (B, 8h, 8w, 3) uint8: decode z / scaling, (x/2 + 0.5) clamped, ×255 rounded."""
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts → (2B, 77, D) text embeddings, unconditional (empty string) first, then conditional."""
    def embed(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids.to(text_encoder.device))[0]

    return torch.cat([embed([""] * len(prompts)), embed(list(prompts))])


# --- the loop --------------------------------------------------------------------------------------

@torch.no_grad()
def blended_latent_loop(
    unet,
    scheduler,
    z_src: torch.Tensor,
    masks: torch.Tensor,
    text_emb: torch.Tensor,
    generators: Sequence[torch.Generator],
    cfg: EditingCfg,
    num_inference_steps: int,
) -> torch.Tensor:
    """Run the blended denoising loop; returns the final latents (B, 4, h, w).

    Args:
        unet: the backbone's ``UNet2DConditionModel``.
        scheduler: a DDIM scheduler (:func:`bld_scheduler`).
        z_src: (B, 4, h, w) source latents (already × scaling factor).
        masks: (B, 1, h, w) latent masks, 1 = edit.
        text_emb: (2B, 77, D) from :func:`encode_prompts`.
        generators: one CPU generator per image (draw order in the module docstring).
        cfg: guidance scale, blending start and the ``init`` / ``blend`` variants.
    """
    device, dtype = z_src.device, z_src.dtype
    timesteps = blend_timesteps(scheduler, num_inference_steps, cfg.blending_start)
    shape = z_src.shape[1:]
    masks = masks.to(device=device, dtype=dtype)
    text_emb = text_emb.to(device=device, dtype=unet.dtype)

    def noised_source(t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return scheduler.add_noise(z_src, noise.to(device=device, dtype=dtype), t.reshape(1))

    def blend(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return z * masks + noised_source(t, standard_normal(generators, shape)) * (1 - masks)

    init_noise = standard_normal(generators, shape).to(device=device, dtype=dtype)
    z = noised_source(timesteps[0], init_noise) if cfg.init == "noised_source" else init_noise
    for t in timesteps:
        if cfg.blend == "before_step":
            z = blend(z, t)
        eps_u, eps_c = unet(torch.cat([z, z]).to(unet.dtype), t, encoder_hidden_states=text_emb).sample.chunk(2)
        eps = eps_u + cfg.guidance_scale * (eps_c - eps_u)
        z = scheduler.step(eps.to(dtype), t, z, eta=0.0).prev_sample
        if cfg.blend == "after_step":
            z = blend(z, t)
    return z


class BlendedLatentEditor:
    """Blended Latent Diffusion with one Stable Diffusion pipeline (base or with a fine-tuned UNet).

    Images are edited at the model's resolution (``unet.config.sample_size × vae_scale_factor``; 512 for
    SD1.4, 128 for ``embedded:tiny-sd``) and returned at that size.
    """

    def __init__(self, pipe, cfg: EditingCfg, num_inference_steps: int, seed: int):
        self.pipe, self.cfg, self.steps, self.seed = pipe, cfg, num_inference_steps, seed
        self.latent_size = int(pipe.unet.config.sample_size)
        self.resolution = self.latent_size * int(pipe.vae_scale_factor)
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.scheduler = bld_scheduler(prediction)

    def loop_timesteps(self) -> torch.Tensor:
        """The timesteps the loop visits (740, 720, ..., 0 for 50 steps and blending start 0.25)."""
        return blend_timesteps(self.scheduler, self.steps, self.cfg.blending_start)

    def image_seed(self, image_id: str) -> int:
        """The seed of ``image_id``'s generator: derived from the global seed and the image id
        (``editing.seeds: per_image``), or ``editing.same_seed`` for every image (``seeds: same``: the PIE-Bench
        editing scripts reseed with 1234 before each image, so every edit starts from the same noise)."""
        if self.cfg.seeds == "same":
            return self.cfg.same_seed
        return derive_seed(self.seed, SEED_KEY, image_id)

    def edit(self, items: Sequence[EditItem]) -> np.ndarray:
        """Edit a batch → (B, R, R, 3) uint8 at the model's resolution R."""
        pipe = self.pipe
        images = torch.stack([source_tensor(it.image, self.resolution) for it in items])
        masks = torch.stack([latent_mask(it.mask, self.latent_size, self.cfg.mask_threshold) for it in items])
        gens = [torch.Generator().manual_seed(self.image_seed(it.image_id)) for it in items]  # the rows' seed
        z_src = encode_source(pipe.vae, images)
        text = encode_prompts(pipe.tokenizer, pipe.text_encoder, [it.prompt for it in items])
        z = blended_latent_loop(pipe.unet, self.scheduler, z_src, masks, text, gens, self.cfg, self.steps)
        return decode_latents(pipe.vae, z)


# --- rows for the shard writer ---------------------------------------------------------------------

def edit_rows(
    editor: BlendedLatentEditor,
    records: Sequence[tuple[str, Any]],
    load: Callable[[str, Any], EditItem],
    batch_size: int,
) -> list[dict[str, Any]]:
    """Edit ``records`` ((image id, payload) pairs, loaded by ``load``) in batches → one row per record.

    Row: ``image_id``, ``image`` (PNG bytes of the edit, or None), ``prompt``, ``seed``, ``mask_fraction``
    (share of latent pixels edited), ``status`` ("ok", "bad_input", "edit_failed"), ``error``.
    A batch that raises is retried image by image so one bad input cannot take its batch down.
    """
    rows: dict[int, dict[str, Any]] = {}
    ready: list[tuple[int, EditItem]] = []
    for i, (image_id, payload) in enumerate(records):
        try:
            ready.append((i, load(image_id, payload)))
        except (OSError, ValueError, KeyError) as err:
            log.warning("%s: cannot load the edit inputs (%s); row kept with status bad_input", image_id, err)
            rows[i] = _row(editor, image_id, "", status=STATUS_BAD_INPUT, error=str(err))
    edited = run_batches([it for _, it in ready], batch_size, lambda items: _edit_batch(editor, items),
                         lambda it, err: _row(editor, it.image_id, it.prompt, status=STATUS_EDIT_FAILED,
                                              error=error_text(err)),
                         lambda it: f"edit of image {it.image_id}")
    rows.update({i: row for (i, _), row in zip(ready, edited)})
    return [rows[i] for i in range(len(records))]


def _edit_batch(editor: BlendedLatentEditor, items: list[EditItem]) -> list[dict[str, Any]]:
    """Rows of one batch of edits (:func:`~pipeline.store.batches.run_batches` retries a failed batch item
    by item; an item that fails alone becomes an ``edit_failed`` row, retried by the next run)."""
    edits = editor.edit(items)
    return [_row(editor, it.image_id, it.prompt, png_bytes(e), _mask_fraction(editor, it.mask))
            for it, e in zip(items, edits)]


def _mask_fraction(editor: BlendedLatentEditor, mask: np.ndarray) -> float:
    """Share of latent pixels the (H, W) pixel mask ``mask`` lets the edit change."""
    return float(latent_mask(mask, editor.latent_size, editor.cfg.mask_threshold).mean())


def _row(editor: BlendedLatentEditor, image_id: str, prompt: str, image: bytes | None = None,
         mask_fraction: float | None = None, status: str = STATUS_OK, error: str = "") -> dict[str, Any]:
    """One ``artifacts/edits`` row (columns in :func:`edit_rows`)."""
    return {"image_id": image_id, "image": image, "prompt": prompt, "seed": editor.image_seed(image_id),
            "mask_fraction": mask_fraction, "status": status, "error": error}


def edit_fingerprint(editor: BlendedLatentEditor, backbone: Backbone, data_root: str | Path) -> dict[str, Any]:
    """What the edits depend on: method params, steps, dtype, seed, backbone weights and input files.

    The batch size and shard layout are left out: they do not change which noise an image gets.
    """
    method = {k: v for k, v in asdict(editor.cfg).items() if k != "max_failed_rate"}  # a limit, not a result
    if editor.cfg.seeds == "per_image":
        method.pop("same_seed")  # unused: changing it changes no edit
    data = files_digest(dir_files(data_root), relative_to=Path(data_root))
    return {"editing": method, "steps": editor.steps, "dtype": str(editor.pipe.unet.dtype),
            "seed": editor.seed, "backbone": asdict(backbone), "weights": component_hashes(editor.pipe), "data": data}
