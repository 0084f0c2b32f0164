"""Training-step time and peak memory: this project's step vs what the original code does, in one run.

Every variant runs a whole training step as :class:`pipeline.training.trainer.Trainer` does (VAE encoding and
posterior sample, text encoding, :func:`pipeline.training.step.compute_losses`: noise, UNet forward with the
paper's grounding losses on mid_8/up_16/up_32/up_64, backward, clipping, AdamW) on synthetic images,
captions and three masked words per sample, with gradient checkpointing as configured. Variants, each
adding one change to the previous one:

* ``baseline`` — what the original does: eager attention in all 32 layers, every self- and cross-attention
  map cloned and stored, every image VAE-encoded at every step, fp32, batch 1;
* ``capture``  — only the 10 cross-attention layers the losses need are captured, SDPA elsewhere;
* ``cached_latents`` — plus the VAE posterior of each image kept from its first encoding
  (:class:`pipeline.training.step.LatentCache`, ``train.cache_latents``). The bench repeats one batch, so this
  is the steady state after the first epoch (the paper profile runs ~21 epochs; the first still encodes);
* ``bf16``     — plus bf16 autocast, frozen encoders in bf16 (GPU only; CPU training stays fp32);
* ``batch4``   — plus batch 4: the paper's effective batch (batch 1 x accumulation 4) in one step;
* ``batch8``   — batch 8 instead (throughput per sample);
* ``no_checkpointing`` — plus gradient checkpointing off (only when the earlier variants had it on: the
  original trains with it; at batch 8 the activations fit, so the recomputation is pure cost);
* ``batch16``  — plus batch 16;
* ``compiled`` — plus ``torch.compile`` of the UNet, capture processors included
  (:func:`pipeline.models.compile_unet`, the pipeline's ``train.compile``; compiled once, in warm-up).

``--device cpu`` uses the embedded tiny model (128 px, latent 16) and measures peak memory as the peak
resident set of a fresh process per variant; ``--device cuda`` uses the SD1.4 architecture (UNet, VAE,
text encoder; random weights) at 512 px and ``torch.cuda.max_memory_allocated``. Writes
bench/results/train_step_<device>.json with per-variant numbers and one ratio per gain; on CUDA after every
variant, with ``complete: false`` until the last, so a run cut short by a time limit keeps what it measured.
On CUDA each variant also gets its FLOPs per sample (counted by :mod:`bench.flops` on the meta device at its
batch and resolution), achieved TFLOP/s and MFU against the device's peak (:mod:`bench.mfu`).

    python bench/train_step.py --device cpu
    python bench/train_step.py --device cuda      # about 4 minutes on an H100 (3 of them compiling)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/train_step.py` from anywhere: bench.* and pipeline.* import
    sys.path.insert(0, str(REPO))

from bench.flops import fp32_math  # noqa: E402
from bench.mfu import train_fields  # noqa: E402
from pipeline.attention import AttentionStore, CaptureProcessor, capture_cross_attention, processor_group  # noqa: E402
from pipeline.models import compile_unet  # noqa: E402
from pipeline.runtime import setup_logging, write_json  # noqa: E402
from pipeline.training.losses import GroundingTargets, LossCfg  # noqa: E402
from pipeline.training.step import LatentCache, SDModels, compute_losses, encode_batch  # noqa: E402

log = logging.getLogger("bench.train_step")
LOSS = LossCfg(token_weight=1e-3, pixel_weight=5e-5, layers=["mid_8", "up_16", "up_32", "up_64"])

@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration; ``checkpointing=None`` keeps the run's ``--checkpointing`` setting."""

    eager: bool              # the original's attention: eager in all layers, every map cloned and stored
    bf16: bool
    batch: int
    cached_latents: bool = True
    checkpointing: bool | None = None
    compiled: bool = False


VARIANTS = {  # each adds one change to the one before it
    "baseline": Variant(eager=True, bf16=False, batch=1, cached_latents=False),
    "capture": Variant(eager=False, bf16=False, batch=1, cached_latents=False),
    "cached_latents": Variant(eager=False, bf16=False, batch=1),
    "bf16": Variant(eager=False, bf16=True, batch=1),
    "batch4": Variant(eager=False, bf16=True, batch=4),
    "batch8": Variant(eager=False, bf16=True, batch=8),
    "no_checkpointing": Variant(eager=False, bf16=True, batch=8, checkpointing=False),
    "batch16": Variant(eager=False, bf16=True, batch=16, checkpointing=False),
    "compiled": Variant(eager=False, bf16=True, batch=16, checkpointing=False, compiled=True),
}
CPU_VARIANTS = ("baseline", "capture", "cached_latents", "batch8", "no_checkpointing", "batch16", "compiled")


class CloningStore(AttentionStore):
    """The original's controller: keeps a clone of every attention map, self-attention included."""

    def add(self, group: str, probs: torch.Tensor) -> None:
        if self.enabled:
            self.maps.setdefault(group, []).append(probs.clone())


def install_baseline(unet) -> AttentionStore:
    """Eager attention with stored maps in all attention layers (16 self, 16 cross)."""
    levels = len(unet.down_blocks)
    groups: dict[str, list[str]] = {}
    for name in unet.attn_processors:
        kind = "" if ".attn2." in name else "self_"
        groups.setdefault(kind + processor_group(name, levels), []).append(name)
    store = CloningStore(groups, unet.config.sample_size)
    owner = {n: g for g, names in groups.items() for n in names}
    unet.set_attn_processor({n: CaptureProcessor(store, owner[n]) for n in unet.attn_processors})
    return store


def build_models(device: str) -> SDModels:
    """Tiny SD (CPU) or SD1.4's architecture (CUDA), random weights; UNet training, encoders frozen."""
    from diffusers import DDPMScheduler

    from pipeline.zoo.sd import (SD14_SCHEDULER, SD14_TEXT, SD14_UNET, SD14_VAE, TINY_TEXT, TINY_UNET, TINY_VAE,
                                 build_sd_components)

    torch.manual_seed(0)
    with torch.device(device):
        parts = build_sd_components(*((SD14_UNET, SD14_VAE, SD14_TEXT) if device == "cuda"
                                      else (TINY_UNET, TINY_VAE, TINY_TEXT)))
    for frozen in (parts["vae"], parts["text_encoder"]):
        frozen.requires_grad_(False).eval()
    return SDModels(unet=parts["unet"].train(), vae=parts["vae"], text_encoder=parts["text_encoder"],
                    tokenizer=None, noise_scheduler=DDPMScheduler.from_config(SD14_SCHEDULER))


def synthetic_batch(models: SDModels, batch: int, device: str):
    """Images (B, 3, R, R) in [-1, 1], token ids (B, 77), image ids and three masked words per sample."""
    gen = torch.Generator().manual_seed(batch)
    res = models.unet.config.sample_size * 8
    pixels = (torch.rand(batch, 3, res, res, generator=gen) * 2 - 1).to(device)
    ids = torch.full((batch, 77), 49407)
    ids[:, 0] = 49406
    ids[:, 1:12] = torch.randint(300, 49000, (batch, 11), generator=gen)
    masks = []
    for _ in range(batch):
        words = [torch.zeros(res, res) for _ in range(3)]
        words[0][: res // 2, : res // 2] = 1
        words[1][res // 4 :, res // 3 :] = 1
        words[2][res // 8 : res // 2, res // 2 :] = 1
        masks.append(words)
    targets = GroundingTargets.from_lists(masks, [[[2], [5, 6], [9]]] * batch, res).to(device)
    return pixels, ids.to(device), [f"image-{b}" for b in range(batch)], targets


def configure(unet, variant: Variant, checkpointing: bool) -> AttentionStore:
    """Put ``unet`` in the variant's state (attention, checkpointing, compilation); returns its store.

    Compilation is in place and stays on (compiling again is a no-op): compiled variants come last.
    """
    store = install_baseline(unet) if variant.eager else capture_cross_attention(unet, LOSS.layers)
    ckpt = checkpointing if variant.checkpointing is None else variant.checkpointing
    if ckpt:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    if variant.compiled:
        compile_unet(unet)
    return store


def run_variant(models: SDModels, name: str, device: str, warmup: int, steps: int, checkpointing: bool) -> dict:
    """Time ``steps`` full training steps of variant ``name`` after ``warmup`` untimed ones (compiling ones
    included, so compile time is not timed; with cached latents the warm-up fills the cache)."""
    variant = VARIANTS[name]
    unet, batch = models.unet, variant.batch
    bf16 = variant.bf16 and device == "cuda"
    store = configure(unet, variant, checkpointing)
    for frozen in (models.vae, models.text_encoder):  # as Trainer: frozen models in the training precision
        frozen.to(torch.bfloat16 if bf16 else torch.float32)
    cache = LatentCache() if variant.cached_latents else None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-6, weight_decay=1e-2)
    pixels, ids, image_ids, targets = synthetic_batch(models, batch, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    times, activation = [], 0.0
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        resident = _reset_peak(device)
        gen = torch.Generator().manual_seed(i)
        latents, states = encode_batch(models, pixels, ids, gen, cache, image_ids)
        with autocast:
            losses = compute_losses(unet, models.noise_scheduler, latents, states, targets, store, LOSS, gen)
        store.reset()
        with store.paused():
            losses.total.backward()
        activation = max(activation, _peak(device) - resident)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    step_s = sum(times[warmup:]) / steps
    out = {"step_s": step_s, "batch": batch, "samples_per_s": batch / step_s, "bf16": bf16,
           "checkpointing": unet.is_gradient_checkpointing, "compiled": variant.compiled,
           "vae_encodes_per_step": "none (cached)" if cache else batch,
           "stored_maps": "all 32 layers, cloned" if variant.eager else "10 cross layers",
           "loss": losses.total.item()}
    if device == "cuda":
        out["fwd_bwd_peak_gib"] = activation / 2**30  # forward+backward peak above weights and optimizer state
        out["step_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30  # whole step incl. AdamW
    del optimizer
    gc.collect()
    return out


def _reset_peak(device: str) -> int:
    """Bytes allocated now; restarts the peak counter (CUDA only)."""
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    now = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return now


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def selected(names, checkpointing: bool) -> list[str]:
    """Variants worth running: ``no_checkpointing`` only adds a change when checkpointing was on."""
    return [n for n in names if n != "no_checkpointing" or checkpointing]


def ratios(results: dict[str, dict], mem_key: str) -> dict[str, float]:
    """One ratio per gain: throughput and memory of each variant vs the previous one and vs the baseline."""
    names = [n for n in VARIANTS if n in results]
    out = {}
    pairs = list(zip(names, names[1:])) + [("baseline", cur) for cur in names[2:]]
    for prev, cur in pairs:
        out[f"{cur}_vs_{prev}_speedup"] = results[cur]["samples_per_s"] / results[prev]["samples_per_s"]
        if mem_key in results[cur]:
            out[f"{cur}_vs_{prev}_memory"] = results[cur][mem_key] / results[prev][mem_key]
    return out


def cpu_child(name: str, warmup: int, steps: int, checkpointing: bool) -> None:
    """Run one variant in this (fresh) process and print its numbers as JSON, peak RSS included."""
    models = build_models("cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out = run_variant(models, name, "cpu", warmup, steps, checkpointing)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["rss_before_steps_gib"] = before
    out["step_rss_gib"] = out["peak_rss_gib"] - before  # what the steps added on top of model and imports
    print(json.dumps(out))


def run_cpu(args) -> dict:
    results = {}
    for name in selected(CPU_VARIANTS, args.checkpointing):
        cmd = [sys.executable, __file__, "--child", name, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--threads", str(args.threads)]
        cmd += ["--checkpointing"] if args.checkpointing else []
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        log.info("%s: %s", name, results[name])
    return {"model": "embedded tiny-sd (UNet, VAE, text encoder; 128 px, latent 16)", "variants": results,
            "skipped": {"bf16": "CPU training runs in fp32"},
            "ratios": ratios(results, "step_rss_gib"),
            "memory": "peak resident set of a fresh process per variant minus its size before the steps "
                      "(for the compiled variant this includes the compiler's own memory during warm-up)"}


def run_in_process(models: SDModels, device: str, args, on_variant=None) -> tuple[dict[str, dict], dict[str, str]]:
    """Every selected variant one after another on the same models: (numbers per variant, skipped ones).

    ``on_variant(variants, skipped)``, when given, is called after each variant with the numbers so far.
    """
    variants, skipped = {}, {}
    for name in selected(VARIANTS, args.checkpointing):
        try:
            variants[name] = run_variant(models, name, device, args.warmup, args.steps, args.checkpointing)
            log.info("%s: %s", name, variants[name])
        except torch.OutOfMemoryError as err:
            skipped[name] = f"out of memory: {str(err).splitlines()[0]}"
            torch.cuda.empty_cache()
        if on_variant is not None:
            on_variant(variants, skipped)
    return variants, skipped


def cuda_results(variants: dict[str, dict], skipped: dict[str, str], device_name: str | None = None) -> dict:
    """The CUDA run's JSON body for the variants measured so far, FLOPs, achieved TFLOP/s and MFU included.

    ``device_name`` defaults to the current CUDA device's (the name ``nvidia-smi`` prints).
    """
    results = {"device_name": device_name or torch.cuda.get_device_name()}
    if skipped:
        results["skipped"] = skipped
    results.update(model="SD1.4 architecture (UNet, VAE, text encoder), random weights, 512 px", variants=variants,
                   ratios=ratios(variants, "fwd_bwd_peak_gib"),
                   memory="fwd_bwd_peak_gib: peak of forward+backward above the memory held before the step "
                          "(weights, optimizer state); step_peak_gib: peak of the last step incl. AdamW")
    return train_fields(results, fp32_math())


def run_cuda(args, save) -> dict:
    """All variants on the SD1.4 architecture; ``save(partial_results)`` after each, so a run stopped by a
    time limit keeps what it measured."""
    variants, skipped = run_in_process(build_models("cuda"), "cuda", args,
                                       lambda v, s: save(cuda_results(v, s), complete=False))
    return cuda_results(variants, skipped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing (default: on for cuda as in the original, off for cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (cpu runs)")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.checkpointing is None:
        args.checkpointing = args.device == "cuda"
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.child:
        cpu_child(args.child, args.warmup, args.steps, args.checkpointing)
        return
    setup_logging()
    path = args.out or Path(f"bench/results/train_step_{args.device}.json")

    def save(results: dict, complete: bool) -> None:
        results = dict(results, device=args.device, complete=complete,
                       threads=torch.get_num_threads() if args.device == "cpu" else None,
                       load_average_1min=os.getloadavg()[0], warmup_steps=args.warmup, timed_steps=args.steps,
                       gradient_checkpointing=args.checkpointing, torch=torch.__version__,
                       losses="token 1e-3 + pixel 5e-5 on mid_8, up_16, up_32, up_64; 3 words per sample")
        write_json(path, results)

    save(run_cuda(args, save) if args.device == "cuda" else run_cpu(args), complete=True)


if __name__ == "__main__":
    main()
