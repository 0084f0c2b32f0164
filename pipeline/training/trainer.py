"""The resumable TokenCompose training loop (SPEC §1.1, §1.5): the run key, the loop and the saved UNet.

The VAE and text encoder are frozen; the whole UNet is trained with AdamW on the loss of
:mod:`pipeline.training.step`.

Determinism: every random draw of micro-step ``m`` on rank ``r`` (VAE posterior sample, noise, timesteps)
comes from ``torch_generator(seed, "train", m, r)``; the data order is a fixed function of the seed and the
micro-step (:class:`pipeline.training.data.StreamBatchSampler`). No RNG state needs saving, so a run resumed
from a checkpoint continues exactly as an uninterrupted run would have.

Each run writes its checkpoints under its own key, ``<out_dir>/checkpoints/<run fingerprint>/``
(:mod:`pipeline.training.checkpoints`), every ``checkpoint_every`` optimizer steps and at the end, and
resumes from the latest one there; the keys of other settings are never touched.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.attention import capture_cross_attention, restore_attention
from pipeline.config import ConfigError
from pipeline.models import compile_unet
from pipeline.seeding import torch_generator
from pipeline.store.identity import code_digest, fingerprint_of
from pipeline.training.checkpoints import (TRAINING_RUN_FILE, find_resume, load_checkpoint, record_run, run_dir,
                                           save_checkpoint)
from pipeline.training.data import GroundedImageDataset, StreamBatchSampler, collate
from pipeline.training.records import TrainRecord, data_fingerprint
from pipeline.training.settings import TrainRun, TrainScale
from pipeline.training.step import (LatentCache, StepLosses, check_finite, compute_losses, encode_batch, load_models,
                                    needs_capture)

log = logging.getLogger(__name__)
CHECKPOINTS_DIR = "checkpoints"  # under out_dir: one folder per run key


# ------------------------------------------------------------------------------------------ the key

def run_identity(run: TrainRun, data_fp: str) -> dict[str, Any]:
    """What a checkpoint's weights depend on, as plain values: model, data, seed, method params, batch layout,
    precision, and the code of this module and what it imports (:func:`pipeline.store.identity.code_digest`:
    its syntax tree, so comments and docstrings do not count)."""
    scale = {k: v for k, v in asdict(run.scale).items() if k not in ("max_steps", "checkpoint_every", "num_workers",
                                                                      "gradient_checkpointing", "compile",
                                                                      "cache_latents")}
    if run.optim.lr_schedule not in ("constant", "constant_with_warmup"):
        scale["max_steps"] = run.scale.max_steps
    train = {k: v for k, v in asdict(run.train).items()
             if k not in ("checkpoint_limit", "max_word_skip_rate", "max_corrupt_rate")}  # limits, not results
    if not run.train.use_ema:
        train.pop("ema_decay")
    return dict(sd_model=run.sd_model, resolution=run.resolution, seed=run.seed, loss=asdict(run.loss),
                optim=asdict(run.optim), train=train, scale=scale, data=data_fp,
                code=code_digest(__name__))  # a checkpoint of other code is not resumed


def run_fingerprint(run: TrainRun, data_fp: str) -> str:
    """The run key: :func:`~pipeline.store.identity.fingerprint_of` the :func:`run_identity`."""
    return fingerprint_of(run_identity(run, data_fp))


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
    """TokenCompose fine-tuning of one UNet on ``records``; :meth:`run_loop` trains and saves the UNet.

    Checkpoints go to ``ckpt_dir`` = ``<out_dir>/checkpoints/<fingerprint>`` (this run's key only)."""

    def __init__(self, run: TrainRun, records: Sequence[TrainRecord]):
        self.run, self.records = run, list(records)
        self.acc = make_accelerator(run.scale)
        self.models = load_models(run.sd_model, run.models_dir)
        self.identity = run_identity(run, data_fingerprint(self.records))
        self.fingerprint = fingerprint_of(self.identity)
        self.ckpt_dir = run_dir(Path(run.out_dir) / CHECKPOINTS_DIR, self.fingerprint)
        self.curves: list[dict[str, float]] = []
        self.latent_cache = LatentCache() if run.scale.cache_latents else None
        self._setup_models()

    def _setup_models(self) -> None:
        """Move the models to the device (frozen ones in the autocast dtype), capture, compile, optimizer, EMA."""
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
        """diffusers' ``EMAModel`` over the UNet's parameters at ``train.ema_decay``."""
        from diffusers.training_utils import EMAModel

        return EMAModel(unet.parameters(), decay=self.run.train.ema_decay, model_cls=type(unet),
                        model_config=unet.config)

    def _lr_scheduler(self, start: int):
        """The learning-rate schedule, fast-forwarded to optimizer step ``start``."""
        from diffusers.optimization import get_scheduler

        sched = get_scheduler(self.run.optim.lr_schedule, self.optimizer, num_warmup_steps=self.run.optim.warmup_steps,
                              num_training_steps=self.run.scale.max_steps)
        with warnings.catch_warnings():  # fast-forwarding a resumed schedule before any optimizer step
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for _ in range(start):
                sched.step()
        return sched

    def _resume(self) -> int:
        """Load the latest checkpoint of this run's key into every process; return its step (0: from scratch)."""
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
        """Batches of this rank for the micro-steps from optimizer step ``start`` to ``max_steps``."""
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
        """Forward, backward (clipping on the last micro-step of ``step``) and optimizer step; the losses."""
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
        """Append the step's curve row: the mean of its ``n`` micro-steps, averaged over processes."""
        keys = sorted(sums)
        mean = torch.tensor([sums[k] / n for k in keys], device=self.acc.device, dtype=torch.float64)
        mean = self.acc.reduce(mean, reduction="mean") if self.acc.num_processes > 1 else mean
        row = {"step": step, "lr": lr, **{k: float(v) for k, v in zip(keys, mean.tolist())}}
        self.curves.append(row)

    def _checkpoint(self, unet, optimizer, step: int) -> None:
        """Save ``checkpoint-<step>`` in this run's key and update its ``run.json`` (main process only)."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = {"step": step, "fingerprint": self.fingerprint, "world_size": self.acc.num_processes,
                     "curves": self.curves}
            save_checkpoint(self.ckpt_dir, step, self.acc.unwrap_model(unet), optimizer, state, self.ema,
                            self.acc.scaler, self.run.train.checkpoint_limit)
            summary = {"params": self.identity, "max_steps": self.run.scale.max_steps,
                       "world_size": self.acc.num_processes}
            record_run(self.ckpt_dir, self.fingerprint, summary, step)
        self.acc.wait_for_everyone()

    def _finish(self, unet, start: int, step: int, samples: int, wall: float) -> TrainResult:
        """Save ``<out_dir>/unet`` (the EMA weights with EMA) and its run file; the run's result."""
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
        """Flat summary metrics: sizes, final-window losses, method settings and the fingerprint."""
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
    """Train (resuming from the latest checkpoint of this run's key) and save ``<out_dir>/unet``."""
    return Trainer(run, records).run_loop()
