"""Detector image preprocessing: the original's resize (``image_backend: pil``), batched and threaded,
against transformers' faster approximation (``torchvision``), measured in the same run on the same images.

For OWLv2 (OWLv2-large's 1008 px input, the MultiGen detector) and OWL-ViT (768 px, the VISOR
detector), on 512 px images (the size SD1.4 samples): seconds per image of one batched processor call with
each backend and of :func:`pipeline.multigen.pixel_values` (one image per thread), and how far the
torchvision tensors lie from the pil ones (max and mean absolute difference in normalised pixel units). No
weights are needed. Writes ``bench/results/detector_preprocess_cpu.json``.

    python bench/detector_preprocess.py [--images 16] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.multigen.detection import PREPROCESS_THREADS, pixel_values
from pipeline.runtime import write_json

OUT = Path(__file__).resolve().parents[1] / "bench" / "results" / "detector_preprocess_cpu.json"


def processors(family: str, backend: str, side: int) -> Any:
    """The image processor of ``family`` (owlv2 | owlvit) at its input ``side`` with ``backend``."""
    square = {"height": side, "width": side}
    if family == "owlv2":
        from transformers.models.owlv2 import image_processing_owlv2 as fast, image_processing_pil_owlv2 as pil

        return pil.Owlv2ImageProcessorPil(size=square) if backend == "pil" else fast.Owlv2ImageProcessor(size=square)
    from transformers.models.owlvit import image_processing_owlvit as fast, image_processing_pil_owlvit as pil

    cls = pil.OwlViTImageProcessorPil if backend == "pil" else fast.OwlViTImageProcessor
    return cls(size=square, crop_size=square)


def test_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Smooth random scenes with fine noise (closer to generated images than white noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
        base = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32)
        out.append(Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)))
    return out


def timed(fn, repeats: int = 2) -> tuple[Any, float]:
    """(result, best wall time of ``repeats`` calls)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def measure(family: str, side: int, images: list[Image.Image]) -> dict[str, float]:
    """Seconds per image of each path and the torchvision-vs-pil difference for one detector family."""
    n = len(images)
    procs = {b: processors(family, b, side) for b in ("pil", "torchvision")}
    batched = {b: timed(lambda p=p: p(images=images, return_tensors="pt")["pixel_values"]) for b, p in procs.items()}
    threaded, threaded_s = timed(lambda: pixel_values(procs["pil"], images))
    pil, tv = batched["pil"][0], batched["torchvision"][0]
    if not bool((threaded == pil).all()):
        raise RuntimeError(f"{family}: threaded pil tensors differ from the batched call")
    diff = (tv - pil).abs()
    return {"input_px": side, "pil_batched_s_per_image": batched["pil"][1] / n,
            "pil_threaded_s_per_image": threaded_s / n,
            "torchvision_batched_s_per_image": batched["torchvision"][1] / n,
            "threaded_vs_batched_pil_speedup": batched["pil"][1] / threaded_s,
            "torchvision_vs_pil_max_abs": float(diff.max()), "torchvision_vs_pil_mean_abs": float(diff.mean())}


def run(count: int, size: int, sides: dict[str, int] | None = None) -> dict[str, Any]:
    """Every measurement in one dict (``sides``: detector input per family, default the real ones)."""
    images = test_images(count, size)
    sides = sides or {"owlv2": 1008, "owlvit": 768}
    result: dict[str, Any] = {"images": count, "image_px": size, "threads": PREPROCESS_THREADS,
                              "cpu_count": os.cpu_count()}
    for family, side in sides.items():
        result[family] = measure(family, side, images)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    result = run(args.images, args.size)
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
