"""FLOP counts of the benchmarked work (bench/flops.py), MFU arithmetic (bench/mfu.py) and the cost table
(bench/cost.py). Everything is counted on the meta device: no memory, no compute, no GPU."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from bench import cost, flops, mfu

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
H100 = "NVIDIA H100 80GB HBM3"


def test_sd14_unet_counts_match_the_reference():
    """SD1.4's UNet at 512 px (64x64 latents, 77 tokens), batch 1: 0.803 TFLOP forward, 2.41 forward+backward."""
    forward = flops.unet_forward_flops(1, 512).total / 1e12
    train = flops.unet_train_flops(1, 512).total / 1e12
    assert forward == pytest.approx(0.803, rel=0.02)
    assert train == pytest.approx(2.41, rel=0.02)
    assert train / forward == pytest.approx(3.0, rel=0.01)  # backward: weight and input gradients
    assert flops.unet_forward_flops(1, 512).conv > 0.5 * flops.unet_forward_flops(1, 512).total


def test_counts_follow_batch_guidance_and_parts():
    one = flops.unet_forward_flops(1, 512)
    assert flops.unet_forward_flops(1, 512, guidance=True).total == flops.unet_forward_flops(2, 512).total \
        == 2 * one.total
    assert flops.unet_forward_flops(1, 256).total < one.total / 3  # 32x32 latents
    cached, uncached = flops.train_step_flops(2, 512), flops.train_step_flops(2, 512, cached_latents=False)
    assert set(cached) == {"text_encoder", "unet", "total"}
    assert uncached["total"].total - cached["total"].total == flops.vae_encode_flops(2, 512).total > 0
    assert cached["total"].total == cached["text_encoder"].total + cached["unet"].total
    assert cached["total"].total == 2 * flops.train_step_flops(1, 512)["total"].total


def test_sampling_counts_run_the_schedulers_evaluations():
    assert flops.unet_evaluations(50) == 51  # PNDM (PLMS only) for SD1.4: one more than the steps
    assert flops.unet_evaluations(10) == 11
    image = flops.sampling_flops(batch=1, steps=50)
    cfg = flops.unet_forward_flops(1, 512, guidance=True)
    assert image["unet"].total == 51 * cfg.total
    assert image["total"].total == (image["unet"].total + flops.vae_decode_flops(1, 512).total
                                    + flops.text_encoder_flops(2).total)
    # diffusers' num_images_per_prompt encodes the prompt once per call, the seeded sampler once per image
    ten = flops.sampling_flops(batch=10, steps=2)
    one_prompt = flops.sampling_flops(batch=10, steps=2, prompts=1)
    assert ten["total"].total - one_prompt["total"].total == flops.text_encoder_flops(18).total \
        == 18 * flops.text_encoder_flops(1).total


def test_peak_table_is_keyed_by_the_recorded_device_names():
    names = {json.loads(p.read_text()).get("device_name") or json.loads(p.read_text())["device"]
             for p in RESULTS.glob("*_cuda*.json")}
    assert names and names <= set(flops.PEAK_TFLOPS)
    for table in flops.PEAK_TFLOPS.values():
        assert table["bf16"] == table["fp16"] == pytest.approx(2 * table["tf32"], rel=0.01)
        assert table["fp32"] < table["tf32"]
    assert flops.PEAK_TFLOPS[H100]["bf16"] == pytest.approx(989, rel=0.01)
    assert flops.peak_tflops("NVIDIA GeForce RTX 4090", "bf16", flops.Flops({"aten.mm": 1}))[0] is None


def test_fp32_peak_is_the_op_mix_rate():
    mix = flops.Flops({"aten.convolution": 3_000, "aten.mm": 1_000})
    peak, basis = flops.peak_tflops(H100, "fp32", mix)
    table = flops.PEAK_TFLOPS[H100]
    assert peak == pytest.approx(4 / (3 / table["tf32"] + 1 / table["fp32"]))
    assert "convolutions at the tf32 peak" in basis
    all_tf32 = flops.peak_tflops(H100, "fp32", mix, {"conv_tf32": True, "matmul_tf32": True})[0]
    assert all_tf32 == pytest.approx(table["tf32"])
    assert flops.peak_tflops(H100, "bf16", mix) == (table["bf16"], "bf16 dense")
    with pytest.raises(ValueError):
        flops.peak_tflops(H100, "fp8", mix)


def _stub_train(batch, resolution, cached_latents, arch):
    per_sample = flops.Flops({"aten.convolution": 3 * 10**12, "aten.mm": 10**12 + (0 if cached_latents else 10**12)})
    return {"total": per_sample * batch}


def _stub_sampling(batch, steps, resolution, prompts, arch):
    return {"total": flops.Flops({"aten.convolution": 40 * 10**12, "aten.bmm": 10 * 10**12}) * batch}


def test_mfu_arithmetic_on_a_synthetic_train_result():
    results = {"device_name": H100, "model": "SD1.4 architecture, 512 px", "complete": True, "variants": {
        "slow": {"batch": 1, "bf16": False, "samples_per_s": 10.0, "vae_encodes_per_step": 1},
        "fast": {"batch": 4, "bf16": True, "samples_per_s": 50.0, "vae_encodes_per_step": "none (cached)"}}}
    out = mfu.train_fields(copy.deepcopy(results), count=_stub_train)
    table = flops.PEAK_TFLOPS[H100]
    slow, fast = out["variants"]["slow"], out["variants"]["fast"]
    assert slow["tflop_per_sample"] == 5.0 and slow["achieved_tflops"] == 50.0  # VAE encode counted: 3 + 2
    fp32_peak = 5 / (3 / table["tf32"] + 2 / table["fp32"])
    assert slow["peak_tflops"] == pytest.approx(fp32_peak, abs=1e-4)
    assert slow["mfu"] == pytest.approx(50 / fp32_peak, abs=1e-4)
    assert fast["tflop_per_sample"] == 4.0 and fast["achieved_tflops"] == 200.0
    assert fast["peak_tflops"] == table["bf16"] and fast["mfu"] == round(200 / table["bf16"], 4)
    assert fast["peak_basis"] == "bf16 dense"
    assert {k: v for k, v in fast.items() if k in results["variants"]["fast"]} == results["variants"]["fast"]
    assert out["complete"] and out["fp32_math"] == flops.TORCH_DEFAULT_FP32_MATH


def test_mfu_arithmetic_on_a_synthetic_sampling_result():
    results = {"device": "NVIDIA H200", "model": "x (512 px)", "steps": 50, "images_per_prompt": 10,
               "a_fp32_batch1_images_per_s": 0.5, "b_float16_batched_images_per_s": 4.0,
               "diffusers_float16_batched_images_per_s": 3.0, "b_float16_batched_speedup": 8.0}
    assert mfu.sampling_variants(results) == {"a_fp32_batch1": (1, "fp32", None),
                                              "b_float16_batched": (10, "fp16", None),
                                              "diffusers_float16_batched": (10, "fp16", 1)}
    numbers, notes = mfu.sampling_fields(results, count=_stub_sampling)
    table = flops.PEAK_TFLOPS["NVIDIA H200"]
    assert numbers["b_float16_batched_tflop_per_image"] == 50.0
    assert numbers["b_float16_batched_achieved_tflops"] == 200.0
    assert numbers["b_float16_batched_mfu"] == round(200 / table["fp16"], 4)
    assert numbers["a_fp32_batch1_achieved_tflops"] == 25.0
    assert numbers["a_fp32_batch1_peak_tflops"] == pytest.approx(50 / (40 / table["tf32"] + 10 / table["fp32"]),
                                                                 abs=1e-4)
    assert notes["peak_basis"]["fp16"] == "fp16 dense" and set(notes["peak_basis"]) == {"fp16", "fp32"}
    with pytest.raises(ValueError):
        mfu.sampling_variants({"steps": 50, "odd_images_per_s": 1.0})


def test_annotate_keeps_fields_and_is_deterministic(tmp_path):
    path = tmp_path / "sampling_throughput_cuda.json"
    original = {"device": H100, "model": "SD1.4 architecture, random weights (512 px)", "steps": 2,
                "images_per_prompt": 2, "complete": True, "seeded_float16_batched_images_per_s": 1.5,
                "seeded_float16_batched_speedup": 3.0}
    path.write_text(json.dumps(original, indent=2) + "\n")
    first = mfu.annotate(path)
    text = path.read_text()
    assert list(first)[: len(original)] == list(original) and all(first[k] == v for k, v in original.items())
    expected = flops.sampling_flops(batch=2, steps=2)["total"].total / 2 / 1e12
    assert first["seeded_float16_batched_tflop_per_image"] == pytest.approx(expected, abs=1e-4)
    assert mfu.annotate(path) == first and path.read_text() == text  # a rerun changes nothing


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("*_cuda*.json")))
def test_results_carry_current_flop_fields(name):
    """The FLOP fields in bench/results are what bench/mfu.py computes now (rerun it after changing flops.py)."""
    results = json.loads((RESULTS / name).read_text())
    flags = results.get("fp32_math")  # the TF32 settings of the run that wrote them
    if "variants" in results:
        assert mfu.train_fields(results, flags) == results
    else:
        numbers, notes = mfu.sampling_fields(results, flags)
        assert {**results, **notes, **numbers} == results


def _results(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def test_cost_rows_use_the_paper_profiles_variants():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    train, sampling = _results(cost.TRAIN_FILE), _results(cost.SAMPLING_FILE)
    work = cost.paper_work(params)
    assert work["multigen_images_per_model"] == 2 * 1000 * 10 and work["visor_images_per_model"] == 2500 * 4
    assert work["train_samples"] == 24000 * 4 and work["edits"] == 700 * len(params["edit_backbones"]) == 2100 and work["mask_images"] == 4526
    assert len(work["plain_models"]) + len(work["other_models"]) == 5
    rows, facts = cost.rows(params, train, sampling)
    assert (facts["s_paper"], facts["t_paper"], facts["t_first"]) == ("seeded_float16_batched", "cached_latents",
                                                                     "capture")
    by_stage = {r.stage.split(" (")[0]: r for r in rows if r.paper[1] is not None}
    rate = sampling["seeded_float16_batched_images_per_s"]
    assert by_stage["`sample`"].paper[1] == pytest.approx(80_000 / rate / 3600)
    assert by_stage["`visor` sampling"].paper[1] == pytest.approx(40_000 / rate / 3600)
    v = train["variants"]
    assert by_stage["`train`"].paper[1] == pytest.approx(
        (4526 / v["capture"]["samples_per_s"] + (96_000 - 4526) / v["cached_latents"]["samples_per_s"]) / 3600)
    assert by_stage["`train`"].fastest[1] == pytest.approx(96_000 / v["compiled"]["samples_per_s"] / 3600)
    unmeasured = [r for r in rows if r.paper[1] is None]
    assert len(unmeasured) == 6 and all(r.fastest[1] is None for r in unmeasured)


def test_cost_doc_totals_and_eight_processes():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    train, sampling = _results(cost.TRAIN_FILE), _results(cost.SAMPLING_FILE)
    rows, _ = cost.rows(params, train, sampling)
    total = sum(r.paper[1] for r in rows if r.paper[1] is not None)
    doc = cost.render(params, train, sampling, _results(cost.MASKS_FILE), {})
    assert f"| **total, measured stages** | | | **{total:.2f}** |" in doc
    assert f"| `--num_processes 8`, ideal (total / 8) | | | {total / 8:.2f} |" in doc
    assert "no H100 measurement yet" in doc
    with_batch4 = copy.deepcopy(train)
    with_batch4["variants"]["batch4"] = dict(train["variants"]["bf16"], batch=4, samples_per_s=12.0)
    assert f"`batch4`, 12.00 samples/s, {96_000 / 12 / 3600:.2f} GPU-h" in cost.render(
        params, with_batch4, sampling, _results(cost.MASKS_FILE), {})


def test_cost_refuses_results_of_other_settings():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    train, sampling = _results(cost.TRAIN_FILE), _results(cost.SAMPLING_FILE)
    with pytest.raises(ValueError, match="steps"):
        cost.rows(params, train, dict(sampling, steps=10))
    with pytest.raises(ValueError, match="H100"):
        cost.rows(params, train, dict(sampling, device="NVIDIA H200"))
    paper_fp16 = copy.deepcopy(params)
    paper_fp16["profiles"]["paper"]["train"]["mixed_precision"] = "fp16"
    with pytest.raises(ValueError, match="training variants"):
        cost.rows(paper_fp16, train, sampling)


def test_official_prompt_files_hold_the_counted_prompts():
    folder = REPO.parent / "shared" / "data" / "multigen"
    if not folder.is_dir():
        pytest.skip("no shared copy of the official MultiGen files")
    from pipeline.datasets.multigen_files import OFFICIAL_FILES

    for file in OFFICIAL_FILES.values():
        assert len(json.loads((folder / file).read_text())) == cost.MULTIGEN_PROMPTS_PER_SET
