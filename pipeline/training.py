"""TokenCompose fine-tuning: data, the training step and a resumable training loop (SPEC §1.1, §1.5).

L = L_denoise + token_weight · L_token + pixel_weight · L_pixel, with L_denoise the MSE between the UNet's
prediction and the noise (or velocity) of a DDPM forward process, and the grounding losses of
:mod:`pipeline.losses` on cross-attention maps captured by :mod:`pipeline.attention` in the same forward.
The VAE and text encoder are frozen; the whole UNet is trained with AdamW.

Determinism: every random draw of micro-step ``m`` on rank ``r`` (VAE posterior sample, noise, timesteps)
comes from ``torch_generator(seed, "train", m, r)``; the data order is a fixed function of the seed and the
micro-step (one shuffled permutation per epoch). No RNG state needs saving, so a run resumed from a
checkpoint continues exactly as an uninterrupted run would have.

Checkpoints (``checkpoint-<step>/``: ``unet/`` in diffusers layout, ``optimizer.pt``, optional ``ema.pt``
and ``scaler.pt``, ``state.json`` with the loss curves so far) are written atomically every
``checkpoint_every`` optimizer steps and at the end, keeping the newest ``checkpoint_limit`` (up to the
current step: those of a longer run with the same settings are left alone).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from pipeline.config import (
    ConfigError, Fraction, FractionBelowOne, InputDataError, NonNegativeFloat, NonNegativeInt, PositiveFloat,
    PositiveInt,
)
from pipeline.attention import AttentionStore, capture_cross_attention, restore_attention
from pipeline.losses import GroundingLoss, GroundingTargets, LossCfg, grounding_loss
from pipeline.models import compile_unet, from_pretrained
from pipeline.seeding import numpy_rng, torch_generator
from pipeline.geometry import resize_center_crop, train_mask
from pipeline.store.shards import STATUS_OK, iter_rows
from pipeline.store.identity import code_digest, fingerprint_of
from pipeline.store.codecs import decode_error, image_from_bytes, rle_decode, rle_encode

log = logging.getLogger(__name__)
TRAINING_RUN_FILE = "training_run.json"  # beside the trained UNet: the run's fingerprint and steps

MAX_TOKENS = 77


# ------------------------------------------------------------------------------------------ params

@dataclass(frozen=True)
class OptimCfg:
    """Params section ``optim`` (AdamW, clipping, schedule)."""

    lr: PositiveFloat
    weight_decay: NonNegativeFloat
    beta1: FractionBelowOne
    beta2: FractionBelowOne
    eps: PositiveFloat
    max_grad_norm: PositiveFloat
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0


@dataclass(frozen=True)
class TrainCfg:
    """Params section ``train`` (method choices shared by all profiles)."""

    skip_ungrounded: bool = False
    empty_masks: Literal["zero_target", "skip"] = "zero_target"  # words whose mask is empty (EMPTY_TARGET_STATUSES)
    use_ema: bool = False
    ema_decay: Fraction = 0.9999
    checkpoint_limit: NonNegativeInt = 10  # checkpoints kept; 0: keep every one
    max_word_skip_rate: Fraction = 0.01  # fail when more usable-status mask rows than this do not fit the images


@dataclass(frozen=True)
class TrainScale:
    """Params section ``profiles.<p>.train`` (sizes, steps, hardware options)."""

    batch_size: PositiveInt
    grad_accum: PositiveInt
    max_steps: PositiveInt
    checkpoint_every: PositiveInt
    mixed_precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # not "no": YAML 1.1 reads a bare no as false
    gradient_checkpointing: bool = False
    compile: bool = False            # torch.compile the UNet (capture processors included); first step compiles
    cache_latents: bool = True       # encode each image once per run (LatentCache), not at every step
    num_workers: NonNegativeInt = 0


@dataclass(frozen=True)
class TrainRun:
    """Everything one training run needs besides its data."""

    sd_model: str
    models_dir: Path
    resolution: int
    seed: int
    loss: LossCfg
    optim: OptimCfg
    train: TrainCfg
    scale: TrainScale
    out_dir: Path


# -------------------------------------------------------------------------------------------- data

@dataclass
class WordTarget:
    """One supervised word: its phrase, token positions (SOT = 0) and training-resolution mask (RLE)."""

    phrase: str
    token_indices: list[int]
    train_mask: dict


@dataclass
class TrainRecord:
    """One training image with its caption and supervised words (possibly none)."""

    image_id: str
    image: bytes
    caption: str
    words: list[WordTarget] = field(default_factory=list)


# Mask statuses of a word whose target is empty at the training resolution: SAM found no pixel, the mask lies
# outside the centre crop, or the authors' PNG is all black. The original trained these words towards an
# all-zero target (token loss the constant 1, BCE pushing the word's attention to 0; SPEC §1.4, §1.6 item 7).
EMPTY_TARGET_STATUSES = ("empty_mask", "outside_crop", "blank_mask")


def _word_problem(row: dict, caption: str | None, resolution: int, zero_targets: bool = True) -> str | None:
    """Why a masks row cannot supervise training (a reason code), or None when it can.

    With ``zero_targets``, rows of :data:`EMPTY_TARGET_STATUSES` can (their ``train_mask`` is empty)."""
    if row.get("status") != STATUS_OK and not (zero_targets and row.get("status") in EMPTY_TARGET_STATUSES):
        return f"mask_status_{row.get('status')}"
    if caption is None:
        return "image_not_in_train_split"
    if row.get("train_mask") is None:
        return "no_train_mask"
    indices = list(row.get("token_indices") or [])
    if not indices:
        return "no_token_indices"
    if max(indices) >= MAX_TOKENS - 1 or min(indices) < 1:  # 76 holds EOT after truncation
        return "token_index_out_of_range"
    if list(row["train_mask"]["size"]) != [resolution, resolution]:
        return "train_mask_size"
    if row.get("caption") != caption:
        return "caption_mismatch"
    return None


def load_records(images_dir: Path, masks_dir: Path | None, resolution: int, skip_ungrounded: bool = False,
                 max_word_skip_rate: float | None = None,
                 empty_masks: str = "zero_target") -> tuple[list[TrainRecord], dict[str, int]]:
    """Training images (split "train", status ok) joined by ``image_id`` with their usable mask rows.

    Words of :data:`EMPTY_TARGET_STATUSES` train towards an all-zero mask (``empty_masks="zero_target"``, the
    original) or are skipped (``"skip"``). Images whose bytes do not decode are left out with a warning
    (``images_corrupt``). Returns the records (sorted by image id) and counts: images,
    grounded/ungrounded images, words used (``words_zero_target`` of them with an empty mask), and one
    ``words_skipped_<reason>`` count per reason a mask row was not used. Images without any usable
    word train on the denoising loss only, or are left out when ``skip_ungrounded``. With
    ``max_word_skip_rate``, raises when a larger share of the ``ok`` mask rows of training images does not
    fit them (:data:`MISMATCH_REASONS`: masks made for other captions, resolution or tokenizer).
    """
    if empty_masks not in ("zero_target", "skip"):
        raise ConfigError(f"train.empty_masks must be 'zero_target' or 'skip', got {empty_masks!r}")
    records: dict[str, TrainRecord] = {}
    stats: dict[str, int] = {"images_not_ok": 0, "images_other_split": 0, "images_corrupt": 0}
    for row in iter_rows(images_dir, columns=["image_id", "image", "caption", "split", "status"]):
        if row["status"] != STATUS_OK:
            stats["images_not_ok"] += 1
        elif row["split"] != "train":
            stats["images_other_split"] += 1
        elif (problem := decode_error(row["image"])) is not None:
            stats["images_corrupt"] += 1
            log.warning("image %s: left out of training, its bytes do not decode (%s); the images shards are "
                        "damaged: rerun `dvc repro train_data`", row["image_id"], problem)
        else:
            records[str(row["image_id"])] = TrainRecord(str(row["image_id"]), row["image"], row["caption"])
    if masks_dir is not None:
        _attach_words(records, masks_dir, resolution, stats, zero_targets=empty_masks == "zero_target")
    used, stats = _select(records, skip_ungrounded, stats)
    if masks_dir is not None and max_word_skip_rate is not None:
        check_word_skips(stats, max_word_skip_rate, masks_dir)
    return used, stats


# Reasons an ``ok`` mask row of a training image cannot be used: the masks do not fit the images (other
# captions, resolution or tokenizer), not an outcome of masking; a few of them mean stale or foreign masks.
MISMATCH_REASONS = ("no_train_mask", "no_token_indices", "token_index_out_of_range", "train_mask_size",
                    "caption_mismatch")


def check_word_skips(stats: dict[str, int], limit: float, masks_dir: Path) -> None:
    """Raise when more than ``limit`` of the joinable mask rows were dropped for a :data:`MISMATCH_REASONS`."""
    dropped = {r: stats.get(f"words_skipped_{r}", 0) for r in MISMATCH_REASONS}
    dropped = {r: n for r, n in dropped.items() if n}
    total = stats.get("words_used", 0) + sum(dropped.values())
    if total and sum(dropped.values()) / total > limit:
        raise InputDataError(f"{masks_dir}: {sum(dropped.values())} of {total} mask rows of training images do "
                             f"not fit them ({dropped}; limit train.max_word_skip_rate={limit:.1%}). The masks were "
                             f"made for other captions, resolution or tokenizer: rerun `dvc repro masks`")


def _attach_words(records: dict[str, TrainRecord], masks_dir: Path, resolution: int, stats: dict,
                  zero_targets: bool) -> None:
    columns = ["image_id", "caption", "phrase", "token_indices", "train_mask", "status"]
    empty = rle_encode(np.zeros((resolution, resolution), dtype=bool))
    stats["words_zero_target"] = 0
    for row in iter_rows(masks_dir, columns=columns):
        record = records.get(str(row["image_id"]))
        zero = zero_targets and row.get("status") in EMPTY_TARGET_STATUSES
        if zero and row.get("train_mask") is None:  # blank authors' PNG: no mask was stored
            row = {**row, "train_mask": empty}
        problem = _word_problem(row, record.caption if record else None, resolution, zero_targets)
        if problem is not None:
            stats[f"words_skipped_{problem}"] = stats.get(f"words_skipped_{problem}", 0) + 1
            continue
        stats["words_zero_target"] += int(zero)
        record.words.append(WordTarget(row["phrase"], [int(i) for i in row["token_indices"]], row["train_mask"]))


def _select(records: dict[str, TrainRecord], skip_ungrounded: bool, stats: dict):
    ordered = [records[k] for k in sorted(records)]
    grounded = [r for r in ordered if r.words]
    stats.update(images_train=len(ordered), images_grounded=len(grounded),
                 images_ungrounded=len(ordered) - len(grounded), words_used=sum(len(r.words) for r in ordered))
    used = grounded if skip_ungrounded else ordered
    stats["images_used"] = len(used)
    if not used:
        grounded_only = " that have an aligned mask (train.skip_ungrounded is on)" if skip_ungrounded else ""
        raise InputDataError(f"no training images: the images stage wrote no ok rows with split 'train'{grounded_only}")
    return used, stats


def check_grounded(stats: dict, loss: LossCfg) -> None:
    """Refuse a run whose grounding losses could never apply: weights > 0 but no image has an aligned mask
    (``stats`` from :func:`load_records`), which would silently be plain fine-tuning."""
    if stats["images_grounded"] == 0 and (loss.token_weight or loss.pixel_weight):
        raise InputDataError("no training image has an aligned mask, so the token and pixel losses would never "
                             "apply; check the masks stage (status counts in metrics/masks.json), or set "
                             "loss.token_weight=0 and loss.pixel_weight=0 to fine-tune on the denoising loss only")


def object_mask_records(images_dir: Path, tokenizer: Any, resolution: int, split: str) -> tuple[list[TrainRecord], int]:
    """Records of ``split`` supervised by the images' own ``objects`` masks (the demo set's true masks).

    Each object name is aligned to the caption's CLIP tokens (:func:`pipeline.text.align_phrase` at the
    name's position in the caption); its mask goes through :func:`pipeline.geometry.train_mask`, as the
    ``masks`` stage's ``train_mask`` column. Returns the records (sorted by id) and the number of objects that
    did not align (left out).
    """
    from pipeline.text import CaptionTokens, align_phrase, locate_phrases

    records, unaligned = [], 0
    for row in iter_rows(images_dir):
        if row["status"] != STATUS_OK or row["split"] != split:
            continue
        record = TrainRecord(str(row["image_id"]), row["image"], row["caption"])
        tokens = CaptionTokens.of(tokenizer, row["caption"])
        names = [o["name"] for o in row["objects"]]
        for obj, start in zip(row["objects"], locate_phrases(row["caption"], names)):
            align = align_phrase(tokenizer, tokens, obj["name"], start=start, caption_id=record.image_id)
            if not align.ok:
                unaligned += 1
                continue
            small = train_mask(rle_decode(obj["mask"]), resolution)
            record.words.append(WordTarget(obj["name"], align.indices, rle_encode(small)))
        records.append(record)
    return sorted(records, key=lambda r: r.image_id), unaligned


def data_fingerprint(records: Sequence[TrainRecord]) -> str:
    """:func:`~pipeline.shards.fingerprint_of` the image ids, image bytes, captions and word targets."""
    return fingerprint_of([[r.image_id, r.image, r.caption, [asdict(w) for w in r.words]] for r in records])


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> (3, R, R) float in [-1, 1] after :func:`resize_center_crop`."""
    arr = np.asarray(resize_center_crop(image.convert("RGB"), resolution), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2.0 - 1.0


class GroundedImageDataset(Dataset):
    """Training examples: ``{"pixel_values": (3, R, R), "input_ids": (77,), "masks": list of (R, R) bool,
    "token_ids": list of index lists, "image_id": str}``."""

    def __init__(self, records: Sequence[TrainRecord], tokenizer: Any, resolution: int):
        self.records = list(records)
        self.tokenizer = tokenizer
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        ids = self.tokenizer(r.caption, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids[0]
        return {
            "pixel_values": image_tensor(image_from_bytes(r.image), self.resolution),
            "input_ids": ids,
            "masks": [torch.from_numpy(rle_decode(w.train_mask)) for w in r.words],
            "token_ids": [list(w.token_indices) for w in r.words],
            "image_id": r.image_id,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and token ids; pad words into :class:`GroundingTargets`."""
    resolution = items[0]["pixel_values"].shape[-1]
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "input_ids": torch.stack([it["input_ids"] for it in items]),
        "targets": GroundingTargets.from_lists([it["masks"] for it in items], [it["token_ids"] for it in items],
                                               resolution),
        "image_ids": [it["image_id"] for it in items],
    }


class StreamBatchSampler(Sampler[list[int]]):
    """Batches of micro-steps ``start .. start+count-1`` from an endless stream of epoch permutations.

    Position ``p`` of the stream is ``perm(p // n)[p % n]`` with ``perm(e)`` drawn from (seed, epoch e).
    Micro-step ``m`` takes positions ``[m·G + r·B, m·G + (r+1)·B)`` on rank ``r`` (G = B · world size), so
    the order depends on nothing but the seed: resuming at micro-step ``start`` continues it exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, count: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.count, self.rank, self.world = start, count, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _at(self, position: int) -> int:
        epoch = position // self.n
        if epoch not in self._perms:
            self._perms = {epoch: numpy_rng(self.seed, "train-order", epoch).permutation(self.n)}
        return int(self._perms[epoch][position % self.n])

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch_size * self.world
        for m in range(self.start, self.start + self.count):
            first = m * g + self.rank * self.batch_size
            yield [self._at(p) for p in range(first, first + self.batch_size)]


# ------------------------------------------------------------------------------------------ models

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


# -------------------------------------------------------------------------------------- the step

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
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, steps)
    raise ConfigError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def _check_grad(store: AttentionStore) -> None:
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


# ------------------------------------------------------------------------------------ checkpoints

CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as (step, path), oldest first."""
    found = []
    for path in Path(ckpt_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        if step.isdigit() and (path / "state.json").is_file():
            found.append((int(step), path))
    return sorted(found)


def save_checkpoint(ckpt_dir: Path, step: int, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, ema: Any = None, scaler: Any = None, limit: int = 10) -> Path:
    """Write ``checkpoint-<step>`` atomically (temporary folder, then rename) and keep the newest ``limit`` up to
    ``step``; checkpoints past ``step`` (a longer run with the same settings) are left alone, so a shorter run
    never deletes the checkpoint it has just written."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = ckpt_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if ema is not None:
        torch.save(ema.state_dict(), tmp / "ema.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "state.json").write_text(json.dumps(state) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    up_to_step = [path for saved, path in list_checkpoints(ckpt_dir) if saved <= step]
    for old in up_to_step[:-limit] if limit > 0 else []:
        shutil.rmtree(old)
    log.info("saved %s", final)
    return final


def load_checkpoint(path: Path, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: Any = None,
                    scaler: Any = None) -> dict:
    """Load weights, optimizer (and EMA/scaler) state from ``path`` in place; return its ``state.json``."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(path / "unet" / "diffusion_pytorch_model.safetensors", device=str(_device_of(unet)))
    unet.load_state_dict(weights)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if ema is not None:
        ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=True))
        ema.to(_device_of(unet))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _checkpoint_fingerprint(path: Path) -> str | None:
    """The fingerprint in a checkpoint's ``state.json`` (None when unreadable: a checkpoint cut short)."""
    try:
        return json.loads((path / "state.json").read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


def remove_stale_checkpoints(ckpt_dir: Path, fingerprint: str) -> None:
    """Delete the checkpoints of another run (other params, data or code). One process only (the main one):
    the others wait, so none reads a checkpoint that is being deleted."""
    for _, path in list_checkpoints(ckpt_dir):
        if _checkpoint_fingerprint(path) != fingerprint:
            log.warning("%s: made with other params, data or code; removing it", path)
            shutil.rmtree(path)


def find_resume(ckpt_dir: Path, fingerprint: str, max_steps: int) -> Path | None:
    """Latest checkpoint of this run (same fingerprint, step <= ``max_steps``), or None; reads only."""
    usable = None
    for step, path in list_checkpoints(ckpt_dir):
        if _checkpoint_fingerprint(path) == fingerprint and step <= max_steps:
            usable = path
    return usable


def run_fingerprint(run: TrainRun, data_fp: str) -> str:
    """What a checkpoint's weights depend on: model, data, seed, method params, batch layout, precision,
    and the code of this module and what it imports (:func:`pipeline.shards.code_digest`)."""
    scale = {k: v for k, v in asdict(run.scale).items() if k not in ("max_steps", "checkpoint_every", "num_workers",
                                                                      "gradient_checkpointing", "compile",
                                                                      "cache_latents")}
    if run.optim.lr_schedule not in ("constant", "constant_with_warmup"):
        scale["max_steps"] = run.scale.max_steps
    train = {k: v for k, v in asdict(run.train).items()
             if k not in ("checkpoint_limit", "max_word_skip_rate")}  # bookkeeping only
    if not run.train.use_ema:
        train.pop("ema_decay")
    blob = dict(sd_model=run.sd_model, resolution=run.resolution, seed=run.seed, loss=asdict(run.loss),
                optim=asdict(run.optim), train=train, scale=scale, data=data_fp,
                code=code_digest(__name__))  # a checkpoint of other code is not resumed
    return fingerprint_of(blob)


# ------------------------------------------------------------------------------------------ the loop

@dataclass
class TrainResult:
    """What a run produced: per-step curve rows, summary metrics (flat; the same for the same params, data
    and code) and facts about this run only (where it resumed, how much it computed, how fast), kept apart
    because they differ between an uninterrupted run and a resumed one that ends with the same weights."""

    curves: list[dict[str, float]]
    metrics: dict[str, Any]
    this_run: dict[str, Any] = field(default_factory=dict)


def precision_name(accelerate_precision: str) -> str:
    """accelerate's ``"no"`` / ``"fp16"`` / ``"bf16"`` in this project's vocabulary (``"fp32"`` for ``"no"``)."""
    return "fp32" if accelerate_precision == "no" else accelerate_precision


def make_accelerator(scale: TrainScale):
    """An ``Accelerator`` with the run's accumulation and precision (fp32 on CPU whatever is asked)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    precision = scale.mixed_precision if torch.cuda.is_available() else "fp32"
    if precision != scale.mixed_precision:
        log.info("mixed_precision %s requested but no GPU: training in fp32", scale.mixed_precision)
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                       gradient_accumulation_steps=scale.grad_accum,
                       cpu=not torch.cuda.is_available())


class Trainer:
    """TokenCompose fine-tuning of one UNet on ``records``; :meth:`run_loop` trains and saves the UNet."""

    def __init__(self, run: TrainRun, records: Sequence[TrainRecord]):
        self.run, self.records = run, list(records)
        self.acc = make_accelerator(run.scale)
        self.models = load_models(run.sd_model, run.models_dir)
        self.ckpt_dir = Path(run.out_dir) / "checkpoints"
        self.fingerprint = run_fingerprint(run, data_fingerprint(self.records))
        self.curves: list[dict[str, float]] = []
        self.latent_cache = LatentCache() if run.scale.cache_latents else None
        self._setup_models()

    def _setup_models(self) -> None:
        run, m, device = self.run, self.models, self.acc.device
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.acc.mixed_precision, torch.float32)
        for frozen in (m.vae, m.text_encoder):
            frozen.to(device)
            if dtype != torch.float32:
                frozen.to(dtype)
        unet = m.unet.to(device).train()
        if run.scale.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.store = capture_cross_attention(unet, run.loss.layers) if needs_capture(run.loss) else None
        if run.scale.compile:
            if run.scale.gradient_checkpointing and self.store is not None:
                log.warning("compile with gradient_checkpointing: the checkpointed blocks store attention maps "
                            "(a side effect torch.compile cannot trace under checkpointing), so they run "
                            "eagerly; set gradient_checkpointing: false for the whole gain")
            compile_unet(unet)
        o = run.optim
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay, eps=o.eps)
        self.ema = self._make_ema(unet) if run.train.use_ema else None

    def _make_ema(self, unet: torch.nn.Module):
        from diffusers.training_utils import EMAModel

        return EMAModel(unet.parameters(), decay=self.run.train.ema_decay, model_cls=type(unet),
                        model_config=unet.config)

    def _lr_scheduler(self, start: int):
        from diffusers.optimization import get_scheduler

        sched = get_scheduler(self.run.optim.lr_schedule, self.optimizer, num_warmup_steps=self.run.optim.warmup_steps,
                              num_training_steps=self.run.scale.max_steps)
        with warnings.catch_warnings():  # fast-forwarding a resumed schedule before any optimizer step
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for _ in range(start):
                sched.step()
        return sched

    def _resume(self) -> int:
        """Load the latest checkpoint of this run into every process; return its step (0: from scratch)."""
        if self.acc.is_main_process:
            remove_stale_checkpoints(self.ckpt_dir, self.fingerprint)
        self.acc.wait_for_everyone()
        path = find_resume(self.ckpt_dir, self.fingerprint, self.run.scale.max_steps)
        if path is None:
            return 0
        made_by = json.loads((path / "state.json").read_text()).get("world_size")
        if made_by != self.acc.num_processes:  # data order and effective batch depend on it: not this run
            raise ConfigError(f"{path} was made by {made_by} processes and this run has {self.acc.num_processes}: "
                                f"resume with {made_by} (e.g. accelerate launch --num_processes {made_by}), or "
                                f"delete {self.ckpt_dir} to start over with {self.acc.num_processes}")
        state = load_checkpoint(path, self.models.unet, self.optimizer, self.ema, self.acc.scaler)
        self.curves = state["curves"]
        log.info("resuming from %s (step %d)", path, state["step"])
        return int(state["step"])

    def _loader(self, start: int) -> DataLoader:
        s, acc = self.run.scale, self.acc
        sampler = StreamBatchSampler(len(self.records), s.batch_size, self.run.seed, start * s.grad_accum,
                                     (s.max_steps - start) * s.grad_accum, acc.process_index, acc.num_processes)
        dataset = GroundedImageDataset(self.records, self.models.tokenizer, self.run.resolution)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=s.num_workers,
                          pin_memory=acc.device.type == "cuda")

    def run_loop(self) -> TrainResult:
        """Train from the latest checkpoint (or from scratch) to ``max_steps`` optimizer steps."""
        start = self._resume()
        unet, optimizer = self.acc.prepare(self.models.unet, self.optimizer)
        sched = self._lr_scheduler(start)
        step, micro_in_step, sums = start, 0, {}
        began, samples = time.perf_counter(), 0
        bar = tqdm(total=self.run.scale.max_steps, initial=start, desc="train", unit="step",
                   disable=not self.acc.is_main_process)
        for micro, batch in enumerate(self._loader(start), start=start * self.run.scale.grad_accum):
            values = self._micro_step(unet, optimizer, batch, micro, step + 1)
            sums = {k: sums.get(k, 0.0) + v for k, v in values.items()}
            micro_in_step += 1
            samples += len(batch["image_ids"]) * self.acc.num_processes
            if not self.acc.sync_gradients:
                continue
            step += 1
            lr = sched.get_last_lr()[0]  # the rate this optimizer step used
            sched.step()
            if self.ema is not None:
                self.ema.step(unet.parameters())
            self._log_step(step, sums, micro_in_step, lr)
            sums, micro_in_step = {}, 0
            bar.update(1)
            if step % self.run.scale.checkpoint_every == 0 or step == self.run.scale.max_steps:
                self._checkpoint(unet, optimizer, step)
        bar.close()
        wall = time.perf_counter() - began
        return self._finish(unet, start, step, samples, wall)

    def _micro_step(self, unet, optimizer, batch: dict, micro: int, step: int) -> dict[str, float]:
        gen = torch_generator(self.run.seed, "train", micro, self.acc.process_index)
        with self.acc.accumulate(unet):
            latents, states = encode_batch(self.models, batch["pixel_values"], batch["input_ids"], gen,
                                           self.latent_cache, batch["image_ids"])
            losses = compute_losses(unet, self.models.noise_scheduler, latents, states, batch["targets"],
                                    self.store, self.run.loss, gen)
            if self.store is not None:
                self.store.reset()
                with self.store.paused():
                    self.acc.backward(losses.total)
            else:
                self.acc.backward(losses.total)
            if self.acc.sync_gradients:
                self.acc.clip_grad_norm_(unet.parameters(), self.run.optim.max_grad_norm)
            values = _loss_values(losses)  # one device sync per micro-step, after the work is queued
            check_finite(values, step, batch["image_ids"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return values

    def _log_step(self, step: int, sums: dict[str, float], n: int, lr: float) -> None:
        keys = sorted(sums)
        mean = torch.tensor([sums[k] / n for k in keys], device=self.acc.device, dtype=torch.float64)
        mean = self.acc.reduce(mean, reduction="mean") if self.acc.num_processes > 1 else mean
        row = {"step": step, "lr": lr, **{k: float(v) for k, v in zip(keys, mean.tolist())}}
        self.curves.append(row)

    def _checkpoint(self, unet, optimizer, step: int) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = {"step": step, "fingerprint": self.fingerprint, "world_size": self.acc.num_processes,
                     "curves": self.curves}
            save_checkpoint(self.ckpt_dir, step, self.acc.unwrap_model(unet), optimizer, state, self.ema,
                            self.acc.scaler, self.run.train.checkpoint_limit)
        self.acc.wait_for_everyone()

    def _finish(self, unet, start: int, step: int, samples: int, wall: float) -> TrainResult:
        model = self.acc.unwrap_model(unet)
        restore_attention(model)
        if self.ema is not None:
            self.ema.copy_to(model.parameters())
        if self.acc.is_main_process:
            unet_dir = Path(self.run.out_dir) / "unet"
            model.save_pretrained(unet_dir, safe_serialization=True)
            run = {"fingerprint": self.fingerprint, "steps": step}  # which run made these weights
            (unet_dir / TRAINING_RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
        this_run = {"resumed_from_step": start, "samples_this_run": samples, "seconds_this_run": round(wall, 2),
                    "samples_per_s": round(samples / wall, 3) if wall > 0 and samples else None,
                    # images through the VAE encoder on rank 0 in this run
                    "vae_encodes_rank0": self.latent_cache.encoded if self.latent_cache
                    else samples // self.acc.num_processes}
        return TrainResult(self.curves, self._metrics(step), this_run)

    def _metrics(self, step: int) -> dict[str, Any]:
        s = self.run.scale
        window = self.curves[-max(1, len(self.curves) // 10):]
        final = {f"final_{k}": float(np.mean([r[k] for r in window if k in r]))
                 for k in ("loss", "denoise", "token", "pixel") if any(k in r for r in window)}
        return {
            "steps": step, "batch_size": s.batch_size, "grad_accum": s.grad_accum,
            "world_size": self.acc.num_processes, "effective_batch": s.batch_size * s.grad_accum * self.acc.num_processes,
            "final_window_steps": len(window), **final, "mixed_precision": precision_name(self.acc.mixed_precision),
            "gradient_checkpointing": s.gradient_checkpointing, "compiled": s.compile,
            "cache_latents": s.cache_latents,
            "ema": self.run.train.use_ema,
            "sd_model": self.run.sd_model, "resolution": self.run.resolution, "layers": ",".join(self.run.loss.layers),
            "token_weight": self.run.loss.token_weight, "pixel_weight": self.run.loss.pixel_weight,
            "lr": self.run.optim.lr, "fingerprint": self.fingerprint,
        }


def _loss_values(losses: StepLosses) -> dict[str, float]:
    """The step's losses as floats (total, denoise, token, pixel and per group), copied in one transfer."""
    named = {"loss": losses.total, "denoise": losses.denoise}
    g = losses.grounding
    if g is not None:
        named.update(token=g.token, pixel=g.pixel)
        named.update({f"token_{k}": v for k, v in g.token_by_group.items()})
        named.update({f"pixel_{k}": v for k, v in g.pixel_by_group.items()})
    values = torch.stack([v.detach().float().reshape(()) for v in named.values()]).tolist()
    return dict(zip(named, values))


def train(run: TrainRun, records: Sequence[TrainRecord]) -> TrainResult:
    """Train (resuming when a checkpoint of this run exists) and save ``<out_dir>/unet``."""
    return Trainer(run, records).run_loop()


def write_curves(path: Path, curves: list[dict[str, float]]) -> None:
    """Per-step curves as CSV (one column per logged value) for ``dvc plots``."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(curves).to_csv(path, index=False, float_format="%.6g")
