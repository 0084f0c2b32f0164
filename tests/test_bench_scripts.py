"""The GPU benchmark scripts run every variant: exercised on the CPU with the tiny models, one step each,
so a GPU run spends its time measuring rather than finding a broken variant."""

from __future__ import annotations

import importlib.util
import math
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def traced_compile(monkeypatch):
    """``compile_unet`` traces with dynamo and AOT autograd but generates no code (fast on a CPU)."""
    from pipeline import models

    monkeypatch.setattr(models, "COMPILE_BACKEND", "aot_eager")
    yield
    torch._dynamo.reset()


def test_train_step_bench_runs_every_variant_in_one_process(traced_compile):
    bench = load_script("train_step")
    models = bench.build_models("cpu")
    saved = []  # what a run stopped by a time limit would have kept after each variant
    variants, skipped = bench.run_in_process(models, "cpu", Namespace(warmup=1, steps=1, checkpointing=True),
                                             lambda v, s: saved.append(list(v)))
    assert list(variants) == list(bench.VARIANTS) and not skipped
    assert saved == [list(bench.VARIANTS)[: i + 1] for i in range(len(bench.VARIANTS))]
    assert all(v["samples_per_s"] > 0 and math.isfinite(v["loss"]) for v in variants.values())
    assert variants["baseline"]["vae_encodes_per_step"] == 1 and variants["baseline"]["checkpointing"]
    assert variants["cached_latents"]["vae_encodes_per_step"] == "none (cached)"
    assert not variants["no_checkpointing"]["checkpointing"] and variants["compiled"]["compiled"]
    assert [v["batch"] for v in variants.values()] == [1, 1, 1, 1, 4, 8, 8, 16, 16]
    ratios = bench.ratios(variants, "fwd_bwd_peak_gib")
    assert ratios["compiled_vs_batch16_speedup"] > 0 and "compiled_vs_baseline_speedup" in ratios
    assert ratios["batch8_vs_batch4_speedup"] > 0 and "batch4_vs_bf16_speedup" in ratios
    # the JSON a CUDA run writes: every variant gets its SD1.4 FLOPs (counted on the meta device) and MFU
    body = bench.cuda_results(variants, skipped, device_name="NVIDIA H100 80GB HBM3")
    assert list(body["variants"]) == list(bench.VARIANTS) and "FlopCounterMode" in body["flops"]
    for name, v in body["variants"].items():
        assert v["achieved_tflops"] == pytest.approx(v["tflop_per_sample"] * v["samples_per_s"], rel=1e-3)
        assert v["mfu"] == pytest.approx(v["achieved_tflops"] / v["peak_tflops"], abs=1e-4)
        assert v["peak_basis"] == ("bf16 dense" if v["bf16"] else
                                   "fp32 mix: convolutions at the tf32 peak, matmuls at the fp32 peak")
    per_sample = {n: v["tflop_per_sample"] for n, v in body["variants"].items()}
    assert per_sample["baseline"] == per_sample["capture"] > per_sample["cached_latents"]  # VAE encoder
    assert len({per_sample[n] for n in bench.VARIANTS if n not in ("baseline", "capture")}) == 1


def test_sampling_bench_runs_every_variant(traced_compile):
    bench = load_script("sampling_throughput")
    saved = []  # what a run stopped by a time limit would have kept after each variant
    processors = []  # attention processor classes of the UNet and VAE at each batch-1 loop
    original = bench.original

    def spy(pipe, *args, **kwargs):
        processors.append({type(p).__name__ for m in (pipe.unet, pipe.vae) for p in m.attn_processors.values()})
        return original(pipe, *args, **kwargs)

    bench.original = spy
    results = bench.run("cpu", num_prompts=2, images=2, steps=2, on_result=saved.append)
    seeded = [name for name, *_ in bench.variants("cpu", 2)]
    assert seeded == ["seeded_fp32_batched", "seeded_fp32_batch4", "seeded_fp32_batch4_compiled"]
    # the diffusers peer runs before the compiled variant (compilation changes the UNet in place)
    names = ["original_fp32_batch1", "sdpa_fp32_batch1", *seeded[:2], bench.peer_variant("cpu"), seeded[2]]
    assert bench.peer_variant("cpu") == "diffusers_fp32_batched"
    # warm-up and timed loop: eager attention everywhere for the original, SDPA everywhere after it
    assert processors == [{"AttnProcessor"}] * 2 + [{"AttnProcessor2_0"}] * 2
    assert [sorted(k[: -len("_images_per_s")] for k in r if k.endswith("_images_per_s")) for r in saved] == [
        sorted(names[: i + 1]) for i in range(len(names))]
    assert saved[-1] == results
    assert results["original_fp32_batch1_images"] == results["sdpa_fp32_batch1_images"] == 2
    assert results["seeded_fp32_batched_images"] == results["diffusers_fp32_batched_images"] == 4
    for name in names[1:]:
        assert results[f"{name}_images_per_s"] > 0
        assert results[f"{name}_speedup"] == pytest.approx(
            results[f"{name}_images_per_s"] / results["original_fp32_batch1_images_per_s"])
    assert results["nan_images"] == 0
    # the JSON a CUDA run writes: FLOPs per image of every variant at its batch and steps, and MFU
    info = {"device": "NVIDIA H100 80GB HBM3", "model": "tiny-sd (128 px)", "resolution": 128, "steps": 2,
            "images_per_prompt": 2}
    body = bench.result_body(info, results, True, flops=True)
    assert body["peak_basis"] == {"fp32": "fp32 mix: convolutions at the tf32 peak, matmuls at the fp32 peak"}
    for name in names:
        assert body[f"{name}_achieved_tflops"] == pytest.approx(
            body[f"{name}_tflop_per_image"] * body[f"{name}_images_per_s"], rel=1e-3)
        assert 0 < body[f"{name}_mfu"] < 1
    assert "diffusers_fp32_batched_mfu" not in bench.result_body(info, results, True, flops=False)


def test_detector_preprocess_bench_measures_both_backends():
    bench = load_script("detector_preprocess")
    result = bench.run(2, 64, sides={"owlv2": 96, "owlvit": 96})
    for family in ("owlv2", "owlvit"):
        m = result[family]
        assert m["input_px"] == 96 and m["torchvision_vs_pil_max_abs"] > 0
        assert all(m[k] > 0 for k in ("pil_batched_s_per_image", "pil_threaded_s_per_image",
                                      "torchvision_batched_s_per_image"))
