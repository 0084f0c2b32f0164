"""The benchmark numbers quoted in README.md are the ones in bench/results/*.json (no stale table cells)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def readme_row(start: str) -> str:
    """The README table row that begins with ``start`` (exactly one)."""
    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(start)]
    assert len(rows) == 1, f"README: {len(rows)} rows start with {start!r}"
    return rows[0]


def result(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def cited(row: str, *cells: str) -> None:
    missing = [c for c in cells if c not in row]
    assert not missing, f"README row does not quote {missing} from bench/results:\n{row}"


def test_sampling_cpu_row():
    r = result("sampling_throughput_cpu.json")
    speed = {k: r[f"{k}_speedup"] for k in ("sdpa_fp32_batch1", "seeded_fp32_batched", "seeded_fp32_batch8",
                                           "seeded_fp32_batch8_compiled")}
    cited(readme_row("| `bench/sampling_throughput.py`"), f"{r['original_fp32_batch1_images_per_s']:.2f} images/s",
          f"SDPA {speed['sdpa_fp32_batch1']:.2f}×", f"batched {speed['seeded_fp32_batched']:.2f}×",
          f"two prompts per call {speed['seeded_fp32_batch8']:.2f}×",
          f"**{speed['seeded_fp32_batch8_compiled']:.2f}×**")


@pytest.mark.parametrize("device,start", [("cpu", "| CPU (2 threads) | tiny-sd"), ("cuda", "| NVIDIA H100"),
                                          ("cuda_h200", "| NVIDIA H200 |")])
def test_sampling_rows_in_docs(device, start):
    r = result(f"sampling_throughput_{device}.json")
    rows = [line for line in (REPO / "docs" / "multigen.md").read_text().splitlines() if line.startswith(start)]
    assert len(rows) == 1
    ips = {k[: -len("_images_per_s")]: v for k, v in r.items() if k.endswith("_images_per_s")}
    cells = [f"| {ips.pop('original_fp32_batch1'):.2f} |"]
    cells += [f"{v:.2f} ({r[name + '_speedup']:.2f}×)" for name, v in ips.items()]
    assert len(cells) == (5 if device == "cpu" else 6)
    if device != "cpu":
        assert r["complete"] and r["device"].startswith(start[2:].rstrip(" |"))
    cited(rows[0], *cells)


def test_sampling_cuda_row():
    r = result("sampling_throughput_cuda.json")
    assert r["complete"] and r["device"].startswith("NVIDIA H100")
    speed = {k: r[f"{k}_speedup"] for k in ("sdpa_fp32_batch1", "seeded_fp32_batched", "seeded_float16_batched",
                                           "seeded_float16_batch20", "seeded_float16_batch20_compiled")}
    cited(readme_row("| same, SD1.4 architecture, 512 px, 50 steps"),
          f"| H100 | {r['original_fp32_batch1_images_per_s']:.2f} images/s", f"SDPA {speed['sdpa_fp32_batch1']:.2f}×",
          f"batched {speed['seeded_fp32_batched']:.2f}×", f"+ fp16 {speed['seeded_float16_batched']:.2f}×",
          f"two prompts per call {speed['seeded_float16_batch20']:.2f}×",
          f"**{speed['seeded_float16_batch20_compiled']:.2f}×**")


TRAIN_GAINS = {"capture": "capture", "cached_latents": "latent cache", "bf16": "bf16", "batch8": "batch 8",
               "no_checkpointing": "checkpointing off", "batch16": "batch 16", "compiled": "`compile`"}


@pytest.mark.parametrize("device,start", [("cpu", "| `bench/train_step.py`"),
                                          ("cuda", "| same, SD1.4 architecture at 512")])
def test_training_rows(device, start):
    r = result(f"train_step_{device}.json")
    ratios, base = r["ratios"], r["variants"]["baseline"]["samples_per_s"]
    row = readme_row(start)
    cited(row, f"{base:.1f} samples/s" if device == "cpu" else f"{base:.2f} samples/s",
          f"capture{' only needed layers' if device == 'cpu' else ''} {ratios['capture_vs_baseline_speedup']:.2f}× "
          f"({ratios['capture_vs_baseline_memory']:.2f}× memory)")
    measured = [n for n in TRAIN_GAINS if n in r["variants"] and n != "capture"]
    assert len(measured) == (4 if device == "cpu" else 6)
    for name in measured:
        speed = f"{ratios[f'{name}_vs_baseline_speedup']:.2f}×"
        cited(row, f"**{speed}**" if name == "compiled" else f"{TRAIN_GAINS[name]} {speed}")
    if device == "cuda":
        assert r["complete"] and r["device_name"].startswith("NVIDIA H100")
        cited(row, f"({ratios['batch8_vs_baseline_memory']:.2f}× memory)",
              f"({ratios['compiled_vs_baseline_memory']:.2f}× memory)")


def test_training_table_in_docs():
    r = result("train_step_cuda.json")
    doc = (REPO / "docs" / "training.md").read_text().splitlines()
    base = r["variants"]["baseline"]["samples_per_s"]
    for name, v in r["variants"].items():
        rows = [line for line in doc if line.startswith("| ") and f"| {v['samples_per_s']:.2f} |" in line]
        assert len(rows) == 1, name
        cited(rows[0], f"| {v['samples_per_s'] / base:.2f}× |", f"| {v['fwd_bwd_peak_gib']:.2f} |",
              f"| {v['step_peak_gib']:.1f} |")


def test_masks_rows():
    cpu, gpu = result("masks_throughput.json"), result("masks_throughput_gpu_h200_fp16.json")
    cited(readme_row("| `bench/masks_throughput.py`"), f"{cpu['single_images_per_s']:.2f} images/s",
          f"{cpu['batched_images_per_s']:.1f} images/s (**{cpu['speedup_batched_vs_single']:.1f}×**)")
    cited(readme_row("| same, real architectures"),
          f"detector {gpu['detector_single_images_per_s']:.1f}, SAM-HQ {gpu['segmenter_single_images_per_s']:.1f} images/s",
          f"detector {gpu['detector_batched_images_per_s']:.1f} images/s (**{gpu['detector_speedup_batched_vs_single']:.2f}×**)",
          f"SAM-HQ {gpu['segmenter_batched_images_per_s']:.1f} images/s ({gpu['segmenter_speedup_batched_vs_single']:.2f}×)")


def test_detector_preprocess_table_in_docs():
    r = result("detector_preprocess_cpu.json")
    doc = (REPO / "docs" / "multigen.md").read_text()
    for family, label in (("owlv2", "| OWLv2, 1008 px |"), ("owlvit", "| OWL-ViT, 768 px |")):
        rows = [line for line in doc.splitlines() if line.startswith(label)]
        assert len(rows) == 1, label
        m = r[family]
        cited(rows[0], f"{m['torchvision_vs_pil_max_abs']:.3f}", f"{m['pil_batched_s_per_image']:.3f} s/image",
              f"{m['pil_threaded_s_per_image']:.3f} s/image ({m['threaded_vs_batched_pil_speedup']:.2f}x)",
              f"{m['torchvision_batched_s_per_image']:.3f} s/image")


def test_detector_preprocess_readme_row():
    m = result("detector_preprocess_cpu.json")["owlv2"]
    cited(readme_row("| `bench/detector_preprocess.py`"), f"{m['pil_batched_s_per_image']:.3f} s/image",
          f"{m['pil_threaded_s_per_image']:.3f} s/image (**{m['threaded_vs_batched_pil_speedup']:.2f}×**)",
          f"{m['torchvision_batched_s_per_image']:.3f} s/image", f"{m['torchvision_vs_pil_max_abs']:.3f}")


def test_cost_doc_is_the_generators_output():
    """docs/cost.md (GPU-hours and MFU tables) is exactly what `python bench/cost.py` writes from the results."""
    from bench import cost

    assert (REPO / "docs" / "cost.md").read_text() == cost.generate()
