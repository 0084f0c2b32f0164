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

import json
import logging
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from pipeline.config import (
    ConfigError, DtypeName, Fraction, NonNegativeFloat, NonNegativeInt, Pixels, PositiveInt, models_dir_of,
    section,
)
from pipeline.models import inference_dtype
from pipeline.datasets.multigen_files import MultiGenPrompt
from pipeline.seeding import standard_normal, torch_generator
from pipeline.sequences import subsequence_starts
from pipeline.store.shards import STATUS_OK, write_shards
from pipeline.store.identity import code_digest
from pipeline.store.codecs import png_bytes

log = logging.getLogger(__name__)

SamplerKind = Literal["sd", "attend_excite"]
TokenRule = Literal["head_word", "last_piece"]
STATUS_TOKENS_FAILED = "token_indices_failed"
STATUS_NAN = "nan_image"
STATUS_FAILED = "sample_failed"
MAX_TOKEN_INDEX = 75  # 77-token CLIP context: SOT at 0, EOT at 76 at the latest (truncation keeps it)


class TokenIndexError(ValueError):
    """A prompt's object could not be aligned to its CLIP tokens; the message names prompt and object."""


@dataclass(frozen=True)
class AttendExciteCfg:
    """``sampling.attend_excite``: diffusers' A&E arguments (SPEC §6.1 defaults) and the token rule."""

    max_iter_to_alter: NonNegativeInt = 25
    thresholds: dict[str, Fraction] = field(default_factory=lambda: {"0": 0.05, "10": 0.5, "20": 0.8})
    scale_factor: NonNegativeFloat = 20.0
    attn_res: tuple[PositiveInt, ...] | None = None  # None: ceil(size / 32) per side (16 x 16 at 512 px)
    token_rule: TokenRule = "head_word"      # head_word: all BPE pieces of the head word; last_piece: SPEC alt. A

    def __post_init__(self) -> None:
        bad = [k for k in self.thresholds if not str(k).isdigit()]
        if bad:
            raise ValueError(f"attend_excite.thresholds: keys are denoising step indices (0, 10, 20), got {bad}")
        if self.attn_res is not None and len(self.attn_res) != 2:
            raise ValueError(f"attend_excite.attn_res: give (height, width) of the attention grid or null, "
                             f"got {list(self.attn_res)}")


@dataclass(frozen=True)
class SamplingCfg:
    """Top-level ``sampling``: method settings identical in every profile."""

    guidance_scale: float = 7.5
    scheduler: str = "default"   # "default": the model's own; else a diffusers scheduler class name
    attend_excite: AttendExciteCfg = AttendExciteCfg()

    def __post_init__(self) -> None:
        if self.scheduler != "default":
            scheduler_class(self.scheduler)


@dataclass(frozen=True)
class SamplingScale:
    """``profiles.<p>.sampling``: how much is sampled and how."""

    num_inference_steps: PositiveInt = 50
    images_per_prompt: PositiveInt = 10
    batch_size: PositiveInt = 10      # images per pipeline call
    resolution: Pixels | None = None  # None: the model's default (unet sample_size x 8)
    dtype: DtypeName = "auto"         # auto: fp16 on CUDA, fp32 on CPU
    shard_size: PositiveInt = 100     # images per Parquet shard (the unit of resume)
    max_prompts: PositiveInt | None = None  # None: the whole prompt file
    compile: bool = False             # torch.compile the UNet (channels_last); plain SD only, not A&E


@dataclass(frozen=True)
class EvalModel:
    """``eval_models.<key>`` (the ``foreach`` of the evaluation stages): what a model is, in every profile."""

    dep: str                          # the DVC dependency holding its weights
    sampler: SamplerKind = "sd"


@dataclass(frozen=True)
class EvalModelRef:
    """``profiles.<p>.eval_models.<key>``: the model references of one evaluated model."""

    model: str                        # base pipeline (hub id, local dir or embedded:NAME)
    unet: str | None = None           # a UNet swapped into the base pipeline (TokenCompose, trained here)
    note: str = ""                    # recorded in metrics (e.g. "stand-in for ...")


def eval_model(params: dict[str, Any], key: str) -> tuple[EvalModel, EvalModelRef]:
    """``eval_models.<key>`` and ``profiles.<p>.eval_models.<key>``, checked against each other.

    Unless ``dep`` (the folder DVC tracks for the model's weights) is the models folder, it must hold the
    ``unet`` or the ``model`` that is loaded: a checkpoint named in ``dep`` with ``unet: null`` would be
    sampled and scored as the base model under the checkpoint's name."""
    model = section(params, f"eval_models.{key}", EvalModel)
    ref = section(params, f"profile.eval_models.{key}", EvalModelRef)
    dep = Path(model.dep).resolve()
    if dep == models_dir_of(params).resolve():
        return model, ref
    loaded = [r for r in (ref.unet, ref.model) if r and not r.startswith("embedded:")]
    if not any(dep == Path(r).resolve() or dep in Path(r).resolve().parents for r in loaded):
        raise ConfigError(f"eval_models.{key}.dep is {model.dep}, but profiles.<p>.eval_models.{key} loads model "
                          f"{ref.model!r} with unet {ref.unet!r}, neither of which lies in it: the weights DVC "
                          f"tracks would not be the ones sampled. Point its unet (or model) at {model.dep}")
    return model, ref


@dataclass(frozen=True)
class SampleItem:
    """One image to sample: image ``image_index`` of prompt ``prompt_id`` of ``promptset``."""

    promptset: str
    prompt_id: int
    image_index: int
    text: str
    objects: tuple[str, ...]


# --- Attend-and-Excite token indices (SPEC §6.3) --------------------------------------------------------

def head_word(name: str) -> tuple[int, str]:
    """(word position, word) of a name's head word: the last word, or X for "X of Y" names."""
    words = name.split(" of ")[0].split()
    if not words:
        raise TokenIndexError(f"object name {name!r} has no words")
    return len(words) - 1, words[-1]


def ae_token_indices(tokenizer: Any, text: str, objects: Sequence[str], rule: TokenRule = "head_word") -> list[int]:
    """Token indices (SOT = 0) that Attend-and-Excite should excite for a MultiGen prompt.

    For each object in order, the token sequence of ``"a " + name`` or ``"an " + name`` (MultiGen writes
    "a" before every name; SR2D writes "an apple") is searched at or after the previous match, the earlier
    occurrence winning; the article is skipped. ``head_word``: every BPE piece of the head word;
    ``last_piece``: only the head word's last piece (one index per object). Each object span must decode to
    its name and every index must lie before EOT and at most at ``MAX_TOKEN_INDEX`` (75). Raises
    :class:`TokenIndexError` naming prompt and object.
    """
    if rule not in ("head_word", "last_piece"):
        raise ValueError(f"token rule {rule!r}: use 'head_word' (SPEC §6.3 default) or 'last_piece' (alternative A)")
    ids = tokenizer(text).input_ids
    pos, out = 1, []
    for name in objects:
        found = []
        for article in ("a", "an"):
            span = tokenizer(f"{article} {name}", add_special_tokens=False).input_ids
            starts = subsequence_starts(ids, span, pos)
            if starts:
                at = starts[0]
                found.append((at, at + len(tokenizer(article, add_special_tokens=False).input_ids), at + len(span)))
        if not found:
            raise TokenIndexError(f"prompt {text!r}: object {name!r} ('a {name}' or 'an {name}') not found in its "
                                  f"CLIP tokens after position {pos}")
        _, first, end = min(found)
        if tokenizer.decode(ids[first:end]).strip() != name:
            raise TokenIndexError(f"prompt {text!r}: tokens {first}..{end - 1} decode to "
                                  f"{tokenizer.decode(ids[first:end])!r}, not {name!r}")
        pieces = [len(tokenizer(w, add_special_tokens=False).input_ids) for w in name.split()]
        if sum(pieces) != end - first:
            raise TokenIndexError(f"prompt {text!r}: {name!r} splits into {end - first} tokens in context but "
                                  f"{sum(pieces)} word by word")
        word, _ = head_word(name)
        head_start = first + sum(pieces[:word])
        head = list(range(head_start, head_start + pieces[word]))
        out += head if rule == "head_word" else head[-1:]
        pos = end
    if any(i >= min(len(ids) - 1, MAX_TOKEN_INDEX + 1) for i in out):
        raise TokenIndexError(f"prompt {text!r}: indices {out} reach EOT or pass {MAX_TOKEN_INDEX}")
    return out


# --- seeds and latents ------------------------------------------------------------------------------------

def image_generator(seed: int, item: SampleItem) -> torch.Generator:
    """The CPU generator of one image, seeded from (seed, "multigen", prompt set, prompt id, image index)."""
    return torch_generator(seed, "multigen", item.promptset, item.prompt_id, item.image_index)


def prompt_items(promptset: str, prompts: Sequence[MultiGenPrompt], images_per_prompt: int) -> list[SampleItem]:
    """All (prompt, image index) items of a prompt set, prompt-major, image indices 0..J-1."""
    return [SampleItem(promptset, p.prompt_id, j, p.text, p.objects)
            for p in prompts for j in range(images_per_prompt)]


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


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class called ``name``; ``ValueError`` when diffusers has none."""
    import diffusers

    found = getattr(diffusers, name, None)
    if not (isinstance(found, type) and issubclass(found, diffusers.SchedulerMixin)):
        raise ValueError(f"scheduler: {name!r} is not a diffusers scheduler class (e.g. DDIMScheduler) "
                         f"or 'default'")
    return found


def component_hashes(pipe: Any) -> dict[str, str]:
    """SHA-256 of the UNet, VAE and text encoder weights (what sampled images depend on)."""
    from pipeline.store.identity import state_dict_hash

    return {name: state_dict_hash(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder")}


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
            for start in range(0, len(todo), self.scale.batch_size):
                results.update(self._batch(todo[start : start + self.scale.batch_size], png_pool))
            results = {n: (image.result() if isinstance(image, Future) else image, status, error)
                       for n, (image, status, error) in results.items()}
        return [self._row(it, self.token_indices(it) if self.kind == "attend_excite" else [], *results[n])
                for n, it in enumerate(items)]

    def _batch(self, batch: list[tuple[int, SampleItem, list[int]]],
               png_pool: ThreadPoolExecutor) -> dict[int, tuple[Any, str, str]]:
        """Sample one batch. If the batch raises, each image is retried alone (seeds are per image, so a
        retried image is the same image), and only the images that fail alone are marked failed.

        PNG encoding is handed to ``png_pool`` (the image slot holds a ``Future``), so it overlaps with
        sampling the next batch instead of leaving the accelerator idle.
        """
        try:
            images = self._call([it for _, it, _ in batch], [tok for _, _, tok in batch])
        except Exception as err:  # noqa: BLE001 - recorded per row, counted and checked by the stage
            if len(batch) > 1:
                log.warning("batch of prompts %s failed (%s); retrying image by image",
                            sorted({it.prompt_id for _, it, _ in batch}), err)
                return {k: v for one in batch for k, v in self._batch([one], png_pool).items()}
            log.exception("sampling failed for prompt %s image %s", batch[0][1].prompt_id, batch[0][1].image_index)
            return {n: (None, STATUS_FAILED, f"{type(err).__name__}: {err}") for n, _, _ in batch}
        out = {}
        for (n, it, _), img in zip(batch, images):
            if not np.isfinite(img).all():
                out[n] = (None, STATUS_NAN, f"{it.promptset} prompt {it.prompt_id} image {it.image_index}: "
                                            f"decoded image has NaN/inf (fp16 overflow?); try dtype float32")
            else:
                out[n] = (png_pool.submit(_png_of, img), STATUS_OK, "")
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


def checkpoint_of(unet: str | None,
                  trained_run: str | Path = "artifacts/train/unet/training_run.json") -> dict[str, Any]:
    """``unet_checkpoint_step`` and ``unet_checkpoint_fingerprint`` of a UNet inside a training checkpoint
    (``checkpoint-<step>/unet``, whose ``state.json`` names the training run), else ``{}``.

    The checkpoints folder holds the last training run of the workspace, which after switching experiments
    may not be the run of ``artifacts/train/unet``: a fingerprint other than ``trained_run``'s is logged."""
    state_file = Path(unet).parent / "state.json" if unet and not unet.startswith("embedded:") else None
    if state_file is None or not state_file.is_file():
        return {}
    state = json.loads(state_file.read_text())
    found = {"unet_checkpoint_step": int(state["step"]), "unet_checkpoint_fingerprint": state.get("fingerprint")}
    trained = Path(trained_run)
    current = json.loads(trained.read_text()).get("fingerprint") if trained.is_file() else None
    if current is not None and current != found["unet_checkpoint_fingerprint"]:
        log.warning("%s comes from the training run %s, not from the run of the trained UNet in this workspace "
                    "(%s, %s): its checkpoints were written by another experiment", unet,
                    found["unet_checkpoint_fingerprint"], current, trained)
    return found


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

