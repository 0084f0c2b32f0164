"""Seeded, batched text-to-image sampling for MultiGen (SPEC §3.2) and the Attend-and-Excite baseline (§6).

Defaults are the original evaluation's: the model's own scheduler (PNDM for SD1.4), 50 steps, guidance
7.5, 512 px (the model's default size), 10 images per prompt. Unlike the original (unseeded, batch 1, fp32,
one GPU), every image has its own generator seeded from (seed, prompt set, prompt id, image index) via
:mod:`pipeline.seeding`; its initial latents are drawn from that generator alone, so image ``j`` of prompt
``p`` starts from the same noise alone, in any batch, on any rank and after a resume (every model gets the
same noise: paired comparisons). Batches of ``batch_size`` images run in one pipeline call; fp16/bf16 on GPU.

Attend-and-Excite (diffusers' ``StableDiffusionAttendAndExcitePipeline``) needs token indices per prompt;
:func:`ae_token_indices` chooses them with SPEC §6.3's rule and validates them.
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.datasets.multigen_files import MultiGenPrompt
from pipeline.eval_models import EvalModel, EvalModelRef, SamplerKind, checkpoint_of
from pipeline.models import inference_dtype
from pipeline.sampling.attend_excite import TokenIndexError, ae_token_indices
from pipeline.sampling.items import SampleItem, image_generator, prompt_items
from pipeline.sampling.settings import SamplingCfg, SamplingScale, scheduler_class
from pipeline.seeding import standard_normal
from pipeline.store.batches import error_text, run_batches
from pipeline.store.codecs import png_bytes
from pipeline.store.identity import code_digest
from pipeline.store.shards import STATUS_OK, write_shards

log = logging.getLogger(__name__)

STATUS_TOKENS_FAILED = "token_indices_failed"
STATUS_NAN = "nan_image"
STATUS_FAILED = "sample_failed"


# --- pipelines ----------------------------------------------------------------------------------------------

PNG_THREADS = 4  # PNG encoders running beside the sampler (zlib releases the GIL)


def _png_of(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) float image in [0, 1], rounded to 8 bits."""
    return png_bytes((image * 255).round().astype(np.uint8))


def load_pipeline(ref: EvalModelRef, sampler: SamplerKind, models_dir: str | Path, cfg: SamplingCfg,
                  dtype: torch.dtype, device: torch.device) -> Any:
    """The pipeline of one evaluated model: base ``ref.model`` with ``ref.unet`` swapped in when given.

    ``attend_excite`` loads diffusers' (deprecated) ``StableDiffusionAttendAndExcitePipeline``.
    ``cfg.scheduler`` other than ``default`` replaces the scheduler by that diffusers class, same config.
    """
    from pipeline.models import load_sd_pipeline

    cls = None
    if sampler == "attend_excite":
        from diffusers import StableDiffusionAttendAndExcitePipeline as cls
    pipe = load_sd_pipeline(ref.model, models_dir, unet_ref=ref.unet, torch_dtype=dtype, device=device,
                            pipeline_cls=cls)
    if cfg.scheduler != "default":
        pipe.scheduler = scheduler_class(cfg.scheduler).from_config(pipe.scheduler.config)
    return pipe


@dataclass
class Sampler:
    """A loaded pipeline plus everything that fixes its images; :meth:`rows` samples a list of items."""

    pipe: Any
    kind: SamplerKind
    cfg: SamplingCfg
    scale: SamplingScale
    seed: int
    _tokens: dict[str, list[int] | str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        """Compile the UNet once when ``sampling.compile`` is on (plain SD only)."""
        if not self.scale.compile:
            return
        if self.kind == "attend_excite":  # its latent updates differentiate through hooked attention
            log.info("sampling.compile is ignored for Attend-and-Excite; it runs eagerly")
            return
        from pipeline.models import compile_unet

        compile_unet(self.pipe.unet, channels_last=self.pipe.unet.device.type == "cuda")

    @property
    def size(self) -> int:
        """Image side in pixels (``scale.resolution`` or the model's default)."""
        return self.scale.resolution or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one initial latent."""
        side = self.size // self.pipe.vae_scale_factor
        return (self.pipe.unet.config.in_channels, side, side)

    def token_indices(self, item: SampleItem) -> list[int] | str:
        """A&E indices of the item's prompt, or the error text when they cannot be chosen (cached)."""
        if item.text not in self._tokens:
            try:
                self._tokens[item.text] = ae_token_indices(self.pipe.tokenizer, item.text, item.objects,
                                                           self.cfg.attend_excite.token_rule)
            except TokenIndexError as err:
                log.warning("%s prompt %d: %s; its images are recorded as failed", item.promptset,
                            item.prompt_id, err)
                self._tokens[item.text] = str(err)
        return self._tokens[item.text]

    def _call(self, items: list[SampleItem], tokens: list[list[int]]) -> np.ndarray:
        """One pipeline call; returns (B, H, W, 3) float images in [0, 1] (NaN where decoding overflowed)."""
        device = self.pipe.unet.device
        gens = [image_generator(self.seed, it) for it in items]
        latents = standard_normal(gens, self.latent_shape()).to(device, self.pipe.unet.dtype)
        kwargs: dict[str, Any] = dict(
            prompt=[it.text for it in items], height=self.size, width=self.size,
            num_inference_steps=self.scale.num_inference_steps, guidance_scale=self.cfg.guidance_scale,
            generator=gens, latents=latents, output_type="np",
        )
        if self.kind == "attend_excite":
            ae = self.cfg.attend_excite
            kwargs.update(token_indices=tokens, max_iter_to_alter=ae.max_iter_to_alter,
                          thresholds={int(k): v for k, v in ae.thresholds.items()},
                          scale_factor=ae.scale_factor, attn_res=tuple(ae.attn_res) if ae.attn_res else None)
        with warnings.catch_warnings():  # A&E's Gaussian smoothing calls meshgrid the deprecated way
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
            return self.pipe(**kwargs).images

    def rows(self, items: Sequence[SampleItem]) -> list[dict[str, Any]]:
        """Sample ``items`` in batches of ``scale.batch_size``; one row per item, failures kept with a reason.

        Row columns: ``prompt_id``, ``image_index``, ``prompt``, ``objects``, ``token_indices``, ``image``
        (PNG bytes or None), ``status``, ``error``.
        """
        results: dict[int, tuple[Any, str, str]] = {}
        todo: list[tuple[int, SampleItem, list[int]]] = []
        for n, it in enumerate(items):
            tok = self.token_indices(it) if self.kind == "attend_excite" else []
            if isinstance(tok, str):
                results[n] = (None, STATUS_TOKENS_FAILED, tok)
            else:
                todo.append((n, it, tok))
        with ThreadPoolExecutor(max_workers=PNG_THREADS) as png_pool:
            sampled = run_batches(todo, self.scale.batch_size, lambda batch: self._batch(batch, png_pool),
                                  lambda one, err: (None, STATUS_FAILED, error_text(err)),
                                  lambda one: f"{one[1].promptset} prompt {one[1].prompt_id} image {one[1].image_index}")
            results.update({n: (image.result() if isinstance(image, Future) else image, status, error)
                            for (n, _, _), (image, status, error) in zip(todo, sampled)})
        return [self._row(it, self.token_indices(it) if self.kind == "attend_excite" else [], *results[n])
                for n, it in enumerate(items)]

    def _batch(self, batch: list[tuple[int, SampleItem, list[int]]],
               png_pool: ThreadPoolExecutor) -> list[tuple[Any, str, str]]:
        """(image, status, error) of each item of one batch (seeds are per image, so an image retried alone
        by :func:`~pipeline.store.batches.run_batches` is the same image).

        PNG encoding is handed to ``png_pool`` (the image slot holds a ``Future``), so it overlaps with
        sampling the next batch instead of leaving the accelerator idle.
        """
        images = self._call([it for _, it, _ in batch], [tok for _, _, tok in batch])
        out = []
        for (_, it, _), img in zip(batch, images):
            if not np.isfinite(img).all():
                out.append((None, STATUS_NAN, f"{it.promptset} prompt {it.prompt_id} image {it.image_index}: "
                                              f"decoded image has NaN/inf (fp16 overflow?); try dtype float32"))
            else:
                out.append((png_pool.submit(_png_of, img), STATUS_OK, ""))
        return out

    @staticmethod
    def _row(item: SampleItem, tokens: Any, image: Any, status: str, error: str) -> dict[str, Any]:
        """One ``artifacts/samples`` row (columns in docs/multigen.md); A&E token indices when resolved."""
        return {"prompt_id": item.prompt_id, "image_index": item.image_index, "prompt": item.text,
                "objects": list(item.objects), "token_indices": tokens if isinstance(tokens, list) else [],
                "image": image, "status": status, "error": error}

    def fingerprint(self, weights: dict[str, str]) -> dict[str, Any]:
        """What the images depend on. Of ``scale`` only the steps and resolution count: batch size and
        compilation change no image's noise, only float rounding (within 1/255 of the decoded pixels), and
        which images are sampled (``max_prompts``, ``images_per_prompt``) is recorded per shard by its items.
        A larger ``max_prompts`` thus keeps the finished shards; another ``images_per_prompt`` moves every
        shard boundary (items are prompt-major), so it samples again."""
        scale = {k: getattr(self.scale, k) for k in ("num_inference_steps", "resolution")}
        cfg = asdict(self.cfg)
        if self.kind != "attend_excite":
            cfg.pop("attend_excite")  # A&E settings change no plain-SD image
        return {"kind": self.kind, "cfg": cfg, "scale": scale, "seed": self.seed,
                "size": self.size, "dtype": str(self.pipe.unet.dtype), "weights": weights,
                "scheduler": type(self.pipe.scheduler).__name__}


def open_sampler(ref: EvalModelRef, model: EvalModel, models_dir: str | Path, cfg: SamplingCfg,
                 scale: SamplingScale, seed: int, device: torch.device) -> Sampler:
    """The :class:`Sampler` of an evaluated model: its pipeline loaded on ``device`` in ``scale.dtype``."""
    pipe = load_pipeline(ref, model.sampler, models_dir, cfg, inference_dtype(scale.dtype, device), device)
    return Sampler(pipe, model.sampler, cfg, scale, seed)


def sampler_record(sampler: Sampler, ref: EvalModelRef) -> dict[str, Any]:
    """What a metrics file records of the model and the sampler settings that made its images (and, for a
    UNet from a training checkpoint, its step and training fingerprint: :func:`checkpoint_of`)."""
    return {"model": ref.model, "unet": ref.unet or "", "note": ref.note, "sampler": sampler.kind,
            "steps": sampler.scale.num_inference_steps, "guidance_scale": sampler.cfg.guidance_scale,
            "size": sampler.size, "dtype": str(sampler.pipe.unet.dtype), **checkpoint_of(ref.unet)}


def sample_prompt_set(sampler: Sampler, promptset: str, prompts: Sequence[MultiGenPrompt], out_dir: Path,
                      weights: dict[str, str], rank: int = 0, world_size: int = 1) -> list[Path]:
    """Sample every image of a prompt set into resumable shards under ``out_dir`` (this rank's share).

    The prompts are not in the fingerprint: each shard records its own items, so a longer prompt list
    whose first prompts are those of the last run (a larger ``max_prompts``) keeps their images."""
    items = prompt_items(promptset, prompts, sampler.scale.images_per_prompt)
    fingerprint = {"sampler": sampler.fingerprint(weights), "promptset": promptset}
    return write_shards(out_dir, items, sampler.rows, sampler.scale.shard_size, fingerprint, rank, world_size,
                        code=code_digest(__name__), desc=f"sample {promptset}",
                        redo_statuses=(STATUS_FAILED,))
