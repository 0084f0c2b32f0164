"""Achieved TFLOP/s and MFU of every GPU benchmark variant, from its measured throughput and counted FLOPs.

For each variant: FLOPs per sample (training) or per image (sampling) at the variant's shapes (batch,
resolution, steps as recorded in the JSON), counted by :mod:`bench.flops` on the meta device; achieved
TFLOP/s = FLOPs per item x items per second; MFU = achieved / the device's dense peak for the variant's
precision (:data:`bench.flops.PEAK_TFLOPS`, by the device name the JSON records). The bench scripts add the
same fields when they run on CUDA; this script adds them to results measured before they did:

    python bench/mfu.py                      # every bench/results/*_cuda*.json, rewritten in place
    python bench/mfu.py path/to/result.json  # only these

All existing fields are kept; the new ones are overwritten on a rerun (same input, same output).
Training fields (in each ``variants.<name>``): ``tflop_per_sample``, ``achieved_tflops``, ``peak_tflops``,
``mfu``, ``peak_basis``. Sampling fields (flat, as the file's others): ``<name>_tflop_per_image``,
``<name>_achieved_tflops``, ``<name>_peak_tflops``, ``<name>_mfu``; ``peak_basis`` per precision.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.flops import (TORCH_DEFAULT_FP32_MATH, Flops, peak_tflops, sampling_flops,  # noqa: E402
                         train_step_flops)

RESULTS = REPO / "bench" / "results"
DIGITS = 4
FLOPS_NOTE = ("model FLOPs counted by torch.utils.flop_counter.FlopCounterMode on the meta device at the "
              "variant's shapes (bench/flops.py): convolutions, linear layers and attention matmuls; "
              "elementwise work and gradient checkpointing's recomputation not counted. MFU = achieved "
              "TFLOP/s / the dense peak of bench/flops.py PEAK_TFLOPS for the variant's precision")
TRAIN_PARTS = "text encoder forward, VAE encoder when latents are not cached, UNet forward + backward"
SAMPLING_PARTS = ("per image: text encoder (prompt + empty negative prompt), UNet x PNDM evaluations x 2 "
                  "(classifier-free guidance), VAE decoder")


def resolution_of(results: dict) -> int:
    """Image side of a result file: its ``resolution`` field, else the ``NNN px`` of its ``model`` text."""
    if "resolution" in results:
        return int(results["resolution"])
    found = re.search(r"(\d+) px", results.get("model", ""))
    if not found:
        raise ValueError(f"no resolution in the result (model: {results.get('model')!r})")
    return int(found.group(1))


def _fields(flops_per_item: float, items_per_s: float, device: str, precision: str, flops: Flops,
            fp32_flags: dict[str, bool] | None) -> dict:
    """TFLOP per item, achieved TFLOP/s, peak TFLOP/s, MFU (None without a known peak) and the peak's basis."""
    achieved = flops_per_item * items_per_s / 1e12
    peak, basis = peak_tflops(device, precision, flops, fp32_flags)
    return {"tflop": round(flops_per_item / 1e12, DIGITS), "achieved_tflops": round(achieved, DIGITS),
            "peak_tflops": None if peak is None else round(peak, DIGITS),
            "mfu": None if peak is None else round(achieved / peak, DIGITS), "peak_basis": basis}


def train_fields(results: dict, fp32_flags: dict[str, bool] | None = None,
                 count: Callable[..., dict[str, Flops]] = train_step_flops, arch: str = "sd14") -> dict:
    """``results`` of ``bench/train_step.py`` (CUDA layout) with the FLOP fields added to every variant.

    A variant's FLOPs are one training step's at its ``batch`` (VAE encoder included when
    ``vae_encodes_per_step`` is not the cached marker), divided by the batch; its precision is bf16 when
    ``bf16`` is set, else fp32. ``fp32_flags``: which fp32 ops ran on TF32 (default: torch's defaults).
    """
    device, res = results["device_name"], resolution_of(results)
    out = dict(results, variants={})
    for name, variant in results["variants"].items():
        cached = "cached" in str(variant["vae_encodes_per_step"])
        flops = count(batch=variant["batch"], resolution=res, cached_latents=cached, arch=arch)["total"]
        f = _fields(flops.total / variant["batch"], variant["samples_per_s"], device,
                    "bf16" if variant["bf16"] else "fp32", flops, fp32_flags)
        out["variants"][name] = dict(variant, tflop_per_sample=f.pop("tflop"), **f)
    out.update(flops=f"{FLOPS_NOTE}; training step: {TRAIN_PARTS}",
               fp32_math=dict(fp32_flags or TORCH_DEFAULT_FP32_MATH))
    return out


def sampling_variants(results: dict) -> dict[str, tuple[int, str, int | None]]:
    """(images per call, precision, prompts per call) of each sampling variant, from its name as the bench
    writes it.

    ``..._batch1`` / ``..._batchN``: N images per call; ``..._batched``: all images of a prompt
    (``images_per_prompt``); the dtype tag ``fp32`` / ``float16`` / ``bfloat16`` gives the precision.
    Prompts per call: 1 for ``diffusers_...`` (``num_images_per_prompt``), else None (one per image).
    """
    precisions = {"fp32": "fp32", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    out = {}
    for key in results:
        if not key.endswith("_images_per_s"):
            continue
        name = key[: -len("_images_per_s")]
        parts = name.split("_")
        batch = next((int(p[5:]) for p in parts if re.fullmatch(r"batch\d+", p)), None)
        if batch is None and "batched" in parts:
            batch = int(results["images_per_prompt"])
        tags = [precisions[p] for p in parts if p in precisions]
        if batch is None or len(tags) != 1:
            raise ValueError(f"sampling variant {name!r}: no batch or precision in its name")
        out[name] = (batch, tags[0], 1 if parts[0] == "diffusers" else None)
    return out


def sampling_fields(results: dict, fp32_flags: dict[str, bool] | None = None,
                    count: Callable[..., dict[str, Flops]] = sampling_flops,
                    arch: str = "sd14") -> tuple[dict[str, float], dict]:
    """(numeric fields, descriptive fields) to add to ``results`` of ``bench/sampling_throughput.py``.

    Numeric: ``<name>_tflop_per_image``, ``_achieved_tflops``, ``_peak_tflops``, ``_mfu`` per variant (None
    without a known peak); descriptive: ``flops``, ``fp32_math`` and ``peak_basis`` per precision.
    """
    device, res, steps = results["device"], resolution_of(results), int(results["steps"])
    numbers, basis = {}, {}
    for name, (batch, precision, prompts) in sampling_variants(results).items():
        flops = count(batch=batch, steps=steps, resolution=res, prompts=prompts, arch=arch)["total"]
        f = _fields(flops.total / batch, results[f"{name}_images_per_s"], device, precision, flops, fp32_flags)
        basis[precision] = f.pop("peak_basis")
        numbers.update({f"{name}_tflop_per_image": f["tflop"], f"{name}_achieved_tflops": f["achieved_tflops"],
                        f"{name}_peak_tflops": f["peak_tflops"], f"{name}_mfu": f["mfu"]})
    notes = {"flops": f"{FLOPS_NOTE}; sampling: {SAMPLING_PARTS}",
             "fp32_math": dict(fp32_flags or TORCH_DEFAULT_FP32_MATH), "peak_basis": dict(sorted(basis.items()))}
    return numbers, notes


def annotate(path: Path) -> dict:
    """Add the FLOP fields to the result file at ``path`` in place; returns the new content.

    Training files (with ``variants``) are written as ``bench/train_step.py`` writes them (keys sorted);
    sampling files keep their key order, the new fields after the old ones.
    """
    from pipeline.runtime import write_json

    results = json.loads(Path(path).read_text())
    if "variants" in results:
        out = train_fields(results)
        write_json(path, out)
        return out
    numbers, notes = sampling_fields(results)
    out = {**results, **notes, **numbers}
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    return out


def main() -> None:
    """Annotate the given result files (default: every ``bench/results/*_cuda*.json``) and print the MFUs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", type=Path)
    args = p.parse_args()
    for path in args.paths or sorted(RESULTS.glob("*_cuda*.json")):
        out = annotate(path)
        if "variants" in out:
            rows = {n: (v["achieved_tflops"], v["mfu"]) for n, v in out["variants"].items()}
        else:
            rows = {n: (out[f"{n}_achieved_tflops"], out[f"{n}_mfu"]) for n in sampling_variants(out)}
        print(path.name)
        for name, (achieved, mfu) in rows.items():
            print(f"  {name:40s} {achieved:8.2f} TFLOP/s  MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}")


if __name__ == "__main__":
    main()
