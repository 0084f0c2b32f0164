"""Throughput of MultiGen sampling: the seeded batched sampler vs the original approach, in one run.

Original approach (SPEC §3.2): fp32, one pipeline call per image (batch 1), default scheduler, in the
original's environment (SPEC §0: torch 1.13.1, diffusers 0.20.0), which has no SDPA, so diffusers ran its
eager ``AttnProcessor`` (``baddbmm`` + softmax) in the UNet and the VAE. The variants, each adding one change:
the same loop with SDPA (``AttnProcessor2_0``, today's default); one generator per image and all images of
a prompt in one call (``pipeline.sampling.Sampler``, fp32); then fp16 (CUDA); then two prompts per call;
then ``sampling.compile`` (torch.compile of the UNet, channels_last on CUDA). All variants encode PNGs (the
original saved PNG files). The two batch-1 loops time the images of one prompt (batch-1 throughput does not
depend on how many are timed); the batched variants time every prompt. Reports images/s and ratios to the
original; compilation happens in an untimed warm-up call. The original also ran the safety checker (one
CLIP ViT-L/14 forward per image); the baseline leaves it out, which can only make the ratios smaller.
A peer variant, ``diffusers_<dtype>_batched``, measures what diffusers' own batching gets with the same
precision and batch: one ``pipe(prompt=[text], num_images_per_prompt=images)`` call per prompt (one
generator per call, not one per image; PNG per image), run before compilation changes the UNet in place.
On CUDA every variant also gets its FLOPs per image (counted by ``bench/flops.py`` on the meta device at its
batch, resolution and steps), achieved TFLOP/s and MFU against the device's peak (``bench/mfu.py``).

  python bench/sampling_throughput.py                      # tiny-sd on CPU -> bench/results/sampling_throughput_cpu.json
  python bench/sampling_throughput.py --device cuda        # SD1.4 architecture, random weights, 512 px, 50 steps
  python bench/sampling_throughput.py --device cuda --quick   # 10 steps (understates the gain: fixed costs weigh more)

Self-contained: builds its models in memory (no downloads), prompts from data/categories/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.flops import fp32_math  # noqa: E402
from bench.mfu import sampling_fields  # noqa: E402
from pipeline.datasets.multigen_source import generate_multigen  # noqa: E402
from pipeline.datasets.categories import load_categories  # noqa: E402
from pipeline.datasets.multigen_files import MultiGenPrompt  # noqa: E402
from pipeline.models import inference_dtype  # noqa: E402
from pipeline.sampling.sampler import Sampler  # noqa: E402
from pipeline.sampling.settings import SamplingCfg, SamplingScale  # noqa: E402
from pipeline.sampling.items import prompt_items  # noqa: E402
from pipeline.store.codecs import png_bytes  # noqa: E402
from pipeline.zoo.sd import SD14_UNET, TINY_UNET  # noqa: E402

log = logging.getLogger("bench.sampling_throughput")


def build_pipeline(device: str):
    """tiny-sd (CPU) or the SD1.4 architecture with random weights (CUDA), fp32, no safety checker."""
    from diffusers import StableDiffusionPipeline

    from pipeline.zoo import build
    from pipeline.zoo.sd import SD14_TEXT, SD14_UNET, SD14_VAE, build_sd_components, clip_tokenizer

    if device == "cpu":
        with tempfile.TemporaryDirectory(prefix="bench-tiny-sd-") as folder:
            build("tiny-sd", Path(folder), seed=0)
            pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                           requires_safety_checker=False)
    else:
        torch.manual_seed(0)
        pipe = StableDiffusionPipeline(tokenizer=clip_tokenizer(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False,
                                       **build_sd_components(SD14_UNET, SD14_VAE, SD14_TEXT))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def set_attention(pipe, eager: bool) -> None:
    """Eager attention (diffusers' ``AttnProcessor``, the original's) or SDPA in every UNet and VAE layer."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for model in (pipe.unet, pipe.vae):
        model.set_attn_processor(AttnProcessor() if eager else AttnProcessor2_0())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def original(pipe, prompts: list[MultiGenPrompt], images: int, steps: int, device: str) -> float:
    """Seconds for the original loop: one ``pipe(prompt=[text])`` call per image, PNG per image."""
    sync(device)
    start = time.perf_counter()
    for p in prompts:
        for _ in range(images):
            png_bytes(pipe(prompt=[p.text], num_inference_steps=steps).images[0])
    sync(device)
    return time.perf_counter() - start


def diffusers_batched(pipe, prompts: list[MultiGenPrompt], images: int, steps: int, device: str) -> float:
    """Seconds for diffusers' own batching: one ``pipe(prompt=[text], num_images_per_prompt=images)`` call per
    prompt (the pipeline's default generator, not one per image), PNG per image."""
    sync(device)
    start = time.perf_counter()
    for p in prompts:
        for image in pipe(prompt=[p.text], num_images_per_prompt=images, num_inference_steps=steps).images:
            png_bytes(image)
    sync(device)
    return time.perf_counter() - start


def peer_variant(device: str) -> str:
    """Name of the diffusers-batching peer: ``diffusers_<dtype>_batched`` at the batched variants' dtype."""
    half = inference_dtype("auto", device)
    return f"diffusers_{str(half).split('.')[-1] if half != torch.float32 else 'fp32'}_batched"


def batched(sampler: Sampler, prompts: list[MultiGenPrompt], device: str, nan: list[int] | None = None) -> float:
    """Seconds for the seeded batched sampler over the same prompts (NaN images counted into ``nan``)."""
    items = prompt_items("bench", prompts, sampler.scale.images_per_prompt)
    sync(device)
    start = time.perf_counter()
    rows = sampler.rows(items)
    sync(device)
    bad = [r for r in rows if r["status"] != "ok"]
    if bad and bad[0]["status"] != "nan_image":  # random fp16 weights may overflow: timing still counts
        raise RuntimeError(f"sampling failed: {bad[0]['error']}")
    if nan is not None:
        nan.append(len(bad))
    return time.perf_counter() - start


def variants(device: str, images: int) -> list[tuple[str, torch.dtype, int, bool]]:
    """(name, dtype, images per call, compiled) of the seeded sampler, each adding one change."""
    half = inference_dtype("auto", device)
    out = [("seeded_fp32_batched", torch.float32, images, False)]
    if half != torch.float32:
        out.append((f"seeded_{str(half).split('.')[-1]}_batched", half, images, False))
    tag = str(half).split(".")[-1] if half != torch.float32 else "fp32"
    out.append((f"seeded_{tag}_batch{2 * images}", half, 2 * images, False))
    out.append((f"seeded_{tag}_batch{2 * images}_compiled", half, 2 * images, True))
    return out


def run(device: str, num_prompts: int, images: int, steps: int, on_result=None) -> dict:
    """Measure the original loop (eager, then SDPA) and each seeded variant on the same prompts.

    Every variant first runs one untimed call of its batch shape (2 steps), so compilation is not timed. The
    diffusers peer (:func:`peer_variant`) runs just before the compiled variant, on the uncompiled UNet.
    ``on_result(results)``, when given, receives the numbers so far after each measurement (a run cut short
    by a time limit keeps what it measured).
    """
    cats = load_categories("coco")
    prompts = [MultiGenPrompt(e["unique_id"], e["text"], tuple(e[f"obj_{k}_attributes"][0] for k in range(1, 6)))
               for e in generate_multigen(cats, num_prompts, seed=0, set_name="coco")]
    pipe = build_pipeline(device)
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    nan: list[int] = []

    def record(name: str, s: float, n: int) -> None:
        seconds[name], counts[name] = s, n
        log.info("%s: %.3f images/s", name, n / s)
        if on_result is not None:
            on_result(throughput(seconds, counts, sum(nan)))

    for name, eager in (("original_fp32_batch1", True), ("sdpa_fp32_batch1", False)):
        set_attention(pipe, eager)
        original(pipe, prompts[:1], 1, steps=2, device=device)                 # warm-up
        record(name, original(pipe, prompts[:1], images, steps, device), images)
    for name, dtype, per_call, compiled in variants(device, images):
        if compiled:  # the peer: diffusers' own batching, same dtype and batch as the first batched variant
            pipe.to(inference_dtype("auto", device))
            diffusers_batched(pipe, prompts[:1], images, steps=2, device=device)  # warm-up
            record(peer_variant(device), diffusers_batched(pipe, prompts, images, steps, device),
                   num_prompts * images)
        pipe.to(dtype)
        scale = SamplingScale(num_inference_steps=steps, images_per_prompt=images, batch_size=per_call,
                              dtype=str(dtype).split(".")[-1], compile=compiled)
        sampler = Sampler(pipe, "sd", SamplingCfg(), scale, seed=0)
        warm = dataclasses.replace(sampler, scale=dataclasses.replace(scale, num_inference_steps=2))
        batched(warm, prompts[: max(1, per_call // images)], device)
        record(name, batched(sampler, prompts, device, nan), num_prompts * images)
    return throughput(seconds, counts, sum(nan))


def throughput(seconds: dict[str, float], counts: dict[str, int], nan_images: int) -> dict:
    """Seconds, images timed, images/s and speedup over the original loop for each measured variant."""
    results = {f"{name}_s": s for name, s in seconds.items()}
    results.update({f"{name}_images": counts[name] for name in seconds})
    results.update({f"{name}_images_per_s": counts[name] / s for name, s in seconds.items()})
    base = results["original_fp32_batch1_images_per_s"]
    results.update({f"{name}_speedup": results[f"{name}_images_per_s"] / base
                    for name in seconds if name != "original_fp32_batch1"})
    results["nan_images"] = nan_images  # random weights can overflow in fp16; such images still count in timing
    return results


def result_body(info: dict, results: dict, complete: bool, flops: bool) -> dict:
    """The JSON written for ``results`` so far: run ``info``, ``complete``, the numbers rounded to 4 decimals
    and, with ``flops`` (CUDA runs), each variant's FLOPs per image, achieved TFLOP/s and MFU (``bench/mfu.py``)."""
    body = {**info, "complete": complete, **{k: round(v, 4) for k, v in results.items()}}
    if flops:
        numbers, notes = sampling_fields(body, fp32_math())
        body.update(notes, **numbers)
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="10 steps and fewer prompts (same kind of ratio)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts, even (default: 4 CPU, 2 CUDA)")
    ap.add_argument("--images", type=int, default=None, help="images per prompt (default 4 CPU, 10 CUDA)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    steps = 10 if args.quick else 50
    prompts = args.prompts or (4 if args.device == "cpu" else 2)
    if prompts % 2:
        sys.exit("--prompts must be even: the two-prompts-per-call variants would compile a second shape")
    images = args.images or (4 if args.device == "cpu" else 10)
    info = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": "tiny-sd (128 px)" if args.device == "cpu" else "SD1.4 architecture, random weights (512 px)",
            "resolution": 8 * (TINY_UNET if args.device == "cpu" else SD14_UNET)["sample_size"],  # VAE: 8 px/latent
            "steps": steps, "prompts": prompts, "images_per_prompt": images,
            "quick": args.quick, "load_average_1min": round(os.getloadavg()[0], 2)}
    name = f"sampling_throughput_{args.device}{'_quick' if args.quick else ''}.json"
    out = args.out or REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(results: dict, complete: bool = False) -> None:
        out.write_text(json.dumps(result_body(info, results, complete, args.device == "cuda"), indent=2) + "\n")

    results = run(args.device, prompts, images, steps=steps, on_result=save)
    save(results, complete=True)
    log.info("%s", json.dumps(results, indent=1))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
