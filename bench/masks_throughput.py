"""Grounded-SAM throughput: images/s of batched vs one-image-at-a-time inference, measured in the same run.

Default: the embedded tiny models on CPU (seconds). ``--device cuda --real-arch`` builds the paper
architectures with random weights (Grounding DINO Swin-T OGC + SAM-HQ ViT-H, float16 unless ``--fp32``) and
times them on a GPU; ``--quick`` shrinks the run. Both modes run the same code as the ``masks`` stage
(:class:`pipeline.masks.jobs.Grounder`: detection, label matching, SAM, union, RLE rows) on synthetic
scenes of one size, and check that the batched rows equal the single-image rows. The detector alone and
SAM alone (a fixed number of boxes per image) are timed too, since random weights may send few boxes to SAM.

    python bench/masks_throughput.py                       # tiny, CPU -> bench/results/masks_throughput.json
    python bench/masks_throughput.py --device cuda --real-arch --quick --out bench/results/masks_throughput_gpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline import zoo
from pipeline.masks.jobs import Grounder, make_job
from pipeline.masks.labels import build_prompt
from pipeline.masks.models import GroundingDetector, HFSamSegmenter, load_segmenter
from pipeline.models import inference_dtype
from pipeline.runtime import write_json
from pipeline.store.codecs import rle_decode
from pipeline.zoo import grounding as zg

log = logging.getLogger("bench.masks")
PHRASES = [["car", "teddy bear", "table"], ["man", "woman", "dog"], ["pizza", "plate", "cup"]]


def scenes(count: int, width: int, height: int) -> list[Image.Image]:
    """``count`` RGB scenes (gradient + three rectangles), seeded by index."""
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        base = np.linspace(150, 240, height, dtype=np.uint8)[:, None, None].repeat(width, 1).repeat(3, 2)
        im = Image.fromarray(base)
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = int(rng.integers(0, width * 2 // 3)), int(rng.integers(0, height * 2 // 3))
            draw.rectangle([x, y, x + width // 4, y + height // 4], fill=tuple(int(c) for c in rng.integers(0, 120, 3)))
        out.append(im)
    return out


def tiny_models(device: torch.device, dtype: torch.dtype, folder: Path):
    """The embedded tiny detector and SAM, built into ``folder`` and loaded as the stage loads them."""
    for name in ("tiny-grounding-dino", "tiny-sam"):
        zoo.build(name, folder / name, seed=0)
    return (GroundingDetector.load("embedded:tiny-grounding-dino", folder, device, dtype),
            load_segmenter("embedded:tiny-sam", folder, device, dtype))


def real_models(device: torch.device, dtype: torch.dtype):
    """Grounding DINO Swin-T (bert-base sized vocabulary, 800/1333 px) and SAM-HQ ViT-H, random weights.

    The contrastive logits are calibrated as in the tiny model (gain chosen for d_model 256), so boxes light
    up a few tokens instead of all of them, as trained models do.
    """
    from transformers import GroundingDinoForObjectDetection, SamHQModel, SamHQProcessor, SamImageProcessor

    torch.manual_seed(0)
    detector_model = GroundingDinoForObjectDetection(zg.real_grounding_dino_config()).eval()
    zg.calibrate_contrastive_logits(detector_model, gain=0.25, bias=zg.CALIBRATION_BIAS)
    processor = zg.grounding_dino_processor(zg.bert_vocab(size=zg.BERT_BASE_VOCAB_SIZE),
                                            {"shortest_edge": 800, "longest_edge": 1333})
    detector = GroundingDetector(processor, detector_model.to(device, dtype), device, dtype)
    sam = SamHQModel(zg.real_sam_hq_config()).eval().to(device, dtype)
    segmenter = HFSamSegmenter(SamHQProcessor(image_processor=SamImageProcessor()), sam, device, dtype)
    return detector, segmenter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(grounder: Grounder, images: list[Image.Image], device: torch.device) -> tuple[float, list]:
    """(seconds, rows) for all images through ``grounder``."""
    jobs = [make_job({"image_id": f"b{i}", "caption": "", "phrases": PHRASES[i % 3]}, im, "ok", "")
            for i, im in enumerate(images)]
    sync(device)
    start = time.perf_counter()
    rows = grounder.run(jobs)
    sync(device)
    return time.perf_counter() - start, rows


def timed_parts(detector, segmenter, images: list[Image.Image], batch: int, device: torch.device,
                boxes_per_image: int) -> dict[str, float]:
    """Seconds of the detector alone and of SAM alone (``boxes_per_image`` fixed boxes) over all images in
    chunks of ``batch``: with random weights the end-to-end run may send few boxes to SAM."""
    rng = np.random.default_rng(0)
    boxes = []
    for im in images:
        xy = rng.uniform(0, 0.6, (boxes_per_image, 2)) * (im.width, im.height)
        wh = rng.uniform(0.1, 0.4, (boxes_per_image, 2)) * (im.width, im.height)
        boxes.append(np.concatenate([xy, xy + wh], axis=1).astype(np.float32))
    prompts = [build_prompt(PHRASES[i % 3]) for i in range(len(images))]
    chunks = [slice(i, i + batch) for i in range(0, len(images), batch)]
    out = {}
    for name, call in (("detector", lambda c: detector.detect(images[c], prompts[c], 0.25, 0.25)),
                       ("segmenter", lambda c: segmenter.segment(images[c], boxes[c]))):
        call(chunks[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for c in chunks:
            call(c)
        sync(device)
        out[name] = time.perf_counter() - start
    return out


def same_rows(a: list[dict], b: list[dict]) -> float:
    """Share of rows with the same status and, for masks, at most 0.1% differing pixels."""
    same = 0
    for x, y in zip(a, b):
        if x["status"] != y["status"]:
            continue
        if x["mask"] is None or np.mean(rle_decode(x["mask"]) != rle_decode(y["mask"])) <= 1e-3:
            same += 1
    return same / max(1, len(a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real-arch", action="store_true", help="paper architectures, random weights")
    parser.add_argument("--quick", action="store_true", help="fewer images")
    parser.add_argument("--fp32", action="store_true", help="float32 on CUDA (default float16)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per mode (best is kept)")
    parser.add_argument("--boxes-per-image", type=int, default=5, help="boxes per image in the SAM-only timing")
    parser.add_argument("--out", default="bench/results/masks_throughput.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    dtype = inference_dtype("float32" if args.fp32 else "auto", device)
    count = (4 if args.quick else 16) if args.real_arch else (8 if args.quick else 32)
    batch = args.batch_size or (4 if args.real_arch else 8)
    size = (640, 480) if args.real_arch else (160, 128)
    with tempfile.TemporaryDirectory() as folder:
        detector, segmenter = real_models(device, dtype) if args.real_arch else tiny_models(device, dtype, Path(folder))
        images = scenes(count, *size)
        results = {}
        for name, bs in (("batched", batch), ("single", 1)):
            grounder = Grounder(detector, segmenter, 0.25, 0.25, bs, 512 if args.real_arch else 128)
            timed_run(grounder, images[:bs], device)  # warm-up (kernels, allocator)
            runs = [timed_run(grounder, images, device) for _ in range(args.repeats)]
            results[name] = (min(t for t, _ in runs), runs[0][1])
            log.info("%s (batch %d): %.2f images/s", name, bs, count / results[name][0])
        parts = {bs: timed_parts(detector, segmenter, images, bs, device, args.boxes_per_image) for bs in (batch, 1)}
    batched_s, single_s = results["batched"][0], results["single"][0]
    rows = results["batched"][1]
    report = {
        "device": args.device, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "real_arch": args.real_arch, "dtype": str(dtype), "images": count,
        "image_size": list(size), "batch_size": batch, "repeats": args.repeats,
        "batched_images_per_s": count / batched_s, "single_images_per_s": count / single_s,
        "speedup_batched_vs_single": single_s / batched_s,
        "rows": len(rows), "rows_with_mask": sum(r["status"] == "ok" for r in rows),
        "boxes_per_image_segmenter_only": args.boxes_per_image,
        **{f"{part}_{mode}_images_per_s": count / parts[bs][part]
           for part in ("detector", "segmenter") for mode, bs in (("batched", batch), ("single", 1))},
        **{f"{part}_speedup_batched_vs_single": parts[1][part] / parts[batch][part] for part in ("detector", "segmenter")},
        "batched_equals_single": same_rows(rows, results["single"][1]),
        "detector_params": sum(p.numel() for p in detector.model.parameters()),
        "segmenter_params": sum(p.numel() for p in segmenter.model.parameters()),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
    }
    if report["rows_with_mask"] == 0:
        log.warning("no row got a mask (random weights matched no box to a phrase): the end-to-end times are "
                    "detection only; quote the detector-alone and segmenter-alone ratios for the two models")
    write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
