"""Grounded-SAM masks: prompt, label matching (SPEC §2.6 + fixes), geometry, models, statuses, resume, authors."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from pipeline import geometry
from pipeline.masks.authors import authors_mask_path, write_authors_masks
from pipeline.masks.grounded_sam import ImageStore, write_grounded_masks
from pipeline.masks.inputs import RunContext
from pipeline.masks.jobs import Detections, Grounder, make_job
from pipeline.masks.labels import build_prompt, match_label
from pipeline.masks.models import (GroundingDetector, HFSamSegmenter, SegmentAnythingSegmenter, load_segmenter,
                                   sam_variant)
from pipeline.masks.overlay import plot_overlay
from pipeline.masks.params import GroundingCfg, MasksScale
from pipeline.masks.summary import check_input_errors, summarize
from pipeline.runtime import FailureRateError
from pipeline.safe_paths import UnsafePathError
from pipeline.store import codecs, shards

REPO = Path(__file__).resolve().parents[1]


# --- fixtures --------------------------------------------------------------------------------------

def scene(width: int, height: int, seed: int) -> np.ndarray:
    """An RGB picture: gradient background with two coloured rectangles."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[...] = np.linspace(180, 240, height, dtype=np.uint8)[:, None, None]
    im = Image.fromarray(pixels)
    draw = ImageDraw.Draw(im)
    for _ in range(2):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        draw.rectangle([x0, y0, x0 + width // 3, y0 + height // 3], fill=tuple(int(c) for c in rng.integers(0, 90, 3)))
    return np.asarray(im)


def image_row(image_id: str, data: bytes | None, status: str = "ok") -> dict:
    return dict(image_id=image_id, image=data, caption=f"caption of {image_id}", split="train", objects=[],
                status=status, error="" if status == "ok" else "download failed")


def nouns_row(image_id: str, phrases: list[str], statuses: list[str] | None = None) -> dict:
    statuses = statuses or ["ok"] * len(phrases)
    return dict(image_id=image_id, caption=f"caption of {image_id}", phrases=phrases,
                token_indices=[[k + 2] if s == "ok" else [] for k, s in enumerate(statuses)],
                phrase_status=statuses, phrase_error=["" if s == "ok" else f"reason {s}" for s in statuses],
                status="ok" if phrases else "no_phrases", error="" if phrases else "no noun phrase")


def write_inputs(root: Path, images: list[dict], nouns: list[dict]) -> None:
    """artifacts/data/images and artifacts/nouns shard folders under ``root`` (preamble schemas)."""
    shards.write_shards(root / "artifacts/data/images", images, lambda c: c, 4, "fixture", code="test")
    shards.write_shards(root / "artifacts/nouns", nouns, lambda c: c, 4, "fixture", code="test")


def good_inputs(n: int) -> tuple[list[dict], list[dict]]:
    sizes = [(96, 128), (128, 96), (112, 112)]
    images = [image_row(f"img{i}", codecs.png_bytes(scene(*sizes[i % 3], i))) for i in range(n)]
    phrases = [["car", "teddy bear", "table"], ["man", "woman"], ["box", "boxes", "kite"]]
    return images, [nouns_row(f"img{i}", phrases[i % 3]) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_refs(embedded, models_dir) -> tuple[str, str, Path]:
    embedded("tiny-grounding-dino")
    embedded("tiny-sam")
    return "embedded:tiny-grounding-dino", "embedded:tiny-sam", models_dir


def scale_for(detector: str, segmenter: str, **kw) -> MasksScale:
    base = dict(source="grounded_sam", detector=detector, segmenter=segmenter, batch_size=4, shard_size=2,
                dtype="auto", overlay_images=2)
    return MasksScale(**{**base, **kw})


# --- embedded models -------------------------------------------------------------------------------

def test_embedded_models_are_seeded_and_load_offline(tmp_path, tiny_refs):
    from transformers import AutoProcessor, GroundingDinoForObjectDetection, SamModel

    from pipeline import zoo
    from pipeline.store.identity import state_dict_hash

    _, _, models_dir = tiny_refs
    for name, cls in (("tiny-grounding-dino", GroundingDinoForObjectDetection), ("tiny-sam", SamModel)):
        again, other = zoo.build(name, tmp_path / "a" / name, 0), zoo.build(name, tmp_path / "b" / name, 1)
        reference = state_dict_hash(cls.from_pretrained(models_dir / name))
        assert state_dict_hash(cls.from_pretrained(again)) == reference
        assert state_dict_hash(cls.from_pretrained(other)) != reference
    model = GroundingDinoForObjectDetection.from_pretrained(models_dir / "tiny-grounding-dino")
    assert model.config.decoder_layers >= 2
    tokenizer = AutoProcessor.from_pretrained(models_dir / "tiny-grounding-dino").tokenizer
    ids = tokenizer("teddy bear . coca-cola?").input_ids
    assert ids[0] == 101 and ids[-1] == 102 and 1012 in ids and 1029 in ids  # ids Grounding DINO hard-codes
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(tokenizer("zebra . coca-cola").input_ids[1:-1]) == "zebra. coca - cola"
    sam = SamModel.from_pretrained(models_dir / "tiny-sam").config
    assert sam.vision_config.num_pos_feats * 2 == sam.prompt_encoder_config.hidden_size


# --- prompt and label matching ---------------------------------------------------------------------

def test_prompt_is_spec_example():
    phrases = ["piece", "carton", "Plate", "Silk", "bananas", "bread", "chocolate spread"]
    assert build_prompt(phrases) == "piece . carton . plate . silk . bananas . bread . chocolate spread."
    assert build_prompt(["cat."]) == "cat."
    assert build_prompt([" Coca-Cola bottle "]) == "coca-cola bottle."


def original_match(p: str, words: list[str]) -> str | None:
    """SPEC §2.6 rules as the original code applies them (quirks included), for the table below."""
    if p in words:
        return p
    for cand in (p.upper(), p.lower(), p.replace(" - ", "-")):
        if cand in words:
            return cand
    found = None
    for w in words:  # loop A
        if w.lower() in p.split(" ") or p.lower() in w.lower().split(" "):
            found = w
            break
    for w in words:  # loop B overrides A
        if w.lower() in p.lower() or p.lower() in w.lower():
            found = w
            break
    if found is None:
        for w in words:
            if all(t in w.lower() for t in p.split(" ")):
                return w
    return found


WORDS = ["piece", "carton", "Plate", "Silk", "bananas", "bread", "chocolate spread"]
# (decoded label, phrases, original code's choice, this project's choice, rule or skip reason)
MATCH_TABLE = [
    ("bread", WORDS, "bread", "bread", "exact"),
    ("plate", WORDS, "Plate", "Plate", "exact"),  # prompt is lower-cased, the word kept its case
    ("chocolate spread", WORDS, "chocolate spread", "chocolate spread", "exact"),
    ("spread", WORDS, "chocolate spread", "chocolate spread", "contains"),
    ("coca - cola bottle", ["Coca-Cola bottle"], "Coca-Cola bottle", "Coca-Cola bottle", "exact"),
    ("chocolate spread.", WORDS, "chocolate spread", "chocolate spread", "exact"),
    ("bread [SEP]", WORDS, "bread", "bread", "exact"),
    ("banana", WORDS, "bananas", "bananas", "prefix"),  # only the first word-piece fired
    ("cat. dog", ["dog", "cat"], "dog", "dog", "contains"),  # label spans two phrases: earliest phrase
    # hyphenated words: a label of one part still finds the word (BERT splits "t-shirt" into t - shirt)
    ("shirt", ["t-shirt"], "t-shirt", "t-shirt", "contains"),
    ("cola bottle", ["Coca-Cola bottle"], "Coca-Cola bottle", "Coca-Cola bottle", "contains"),
    ("decker bus", ["dog", "double-decker bus"], "double-decker bus", "double-decker bus", "contains"),
    ("t - shirt", ["shirt"], "shirt", "shirt", "contains"),
    # quirk 1 fixed: character substrings ("man" inside "woman") no longer match
    ("man", ["woman"], "woman", None, "unmatched_label"),
    ("woman table", ["man", "woman"], "man", "woman", "contains"),  # original: substring loop overrides
    ("man", ["woman", "man"], "man", "man", "exact"),
    ("ball", ["football"], "football", None, "unmatched_label"),
    ("cat", ["category"], "category", "category", "prefix"),  # a word-piece label ("cat" ##egory) still maps
    # quirk 2 fixed: an empty label no longer goes to the first phrase
    ("", WORDS, "piece", None, "empty_label"),
    ("[SEP]", WORDS, None, None, "empty_label"),
    (". .", WORDS, None, None, "empty_label"),
]


@pytest.mark.parametrize("label,phrases,original,fixed,rule", MATCH_TABLE)
def test_match_label_table(label, phrases, original, fixed, rule):
    assert original_match(label, phrases) == original  # the table describes the original faithfully
    k, why = match_label(label, phrases)
    assert (phrases[k] if k is not None else None) == fixed
    assert why == rule


def test_boxes_of_one_phrase_are_unioned_not_last_wins(tiny_refs):
    """Quirk 3 fixed: two labels of one phrase -> union of both SAM masks, enclosing box, best score."""
    _, seg_ref, models_dir = tiny_refs
    segmenter = load_segmenter(seg_ref, models_dir, torch.device("cpu"), torch.float32)
    image = Image.fromarray(scene(128, 96, 0))
    boxes = np.array([[4, 4, 40, 50], [60, 30, 120, 90], [10, 60, 50, 95]], np.float32)
    det = Detections(boxes, np.array([0.3, 0.6, 0.9], np.float32), ["cat", "cat.", "woman"])
    grounder = Grounder(FixedDetector([det]), segmenter, 0.25, 0.25, 4, 64)
    rows = grounder.run([make_job(nouns_row("a", ["cat", "man"]), image, "ok", "")])
    single = segmenter.segment([image], [boxes[:2]])[0]
    cat, man = rows
    assert np.array_equal(codecs.rle_decode(cat["mask"]), single[0] | single[1])
    assert cat["box"] == pytest.approx([4, 4, 120, 90]) and cat["score"] == pytest.approx(0.6)
    assert man["status"] == "no_detection" and man["mask"] is None  # "woman" is not "man"
    assert "'woman': unmatched_label" in man["error"]


class FixedDetector:
    """A detector stand-in returning given detections (or raising for images marked to fail)."""

    def __init__(self, detections: list[Detections], fail_on: set[int] | None = None):
        self.detections, self.fail_on, self.calls = detections, fail_on or set(), []

    def detect(self, images, prompts, box_threshold, text_threshold):
        self.calls.append(list(prompts))
        if any(im.width in self.fail_on for im in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return [self.detections[0] for _ in images]


class FixedSegmenter:
    """A segmenter stand-in returning one given (H, W) mask per box."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask

    def segment(self, images, boxes):
        return [np.repeat(self.mask[None], len(b), axis=0) for b in boxes]


def test_empty_and_outside_crop_masks_get_statuses():
    image = Image.fromarray(scene(160, 64, 1))  # wide: the 64 px crop drops 48 columns each side
    det = Detections(np.array([[0, 0, 20, 20]], np.float32), np.array([0.5], np.float32), ["cat"])
    job = make_job(nouns_row("w", ["cat"]), image, "ok", "")
    empty = Grounder(FixedDetector([det]), FixedSegmenter(np.zeros((64, 160), bool)), 0.25, 0.25, 2, 64)
    assert empty.run([job])[0]["status"] == "empty_mask"
    edge = np.zeros((64, 160), bool)
    edge[:, :20] = True
    row = Grounder(FixedDetector([det]), FixedSegmenter(edge), 0.25, 0.25, 2, 64).run([job])[0]
    assert row["status"] == "outside_crop" and not codecs.rle_decode(row["train_mask"]).any()
    assert codecs.rle_decode(row["mask"]).sum() == 64 * 20


def test_failing_batch_is_retried_per_image():
    ok_image, bad_image = Image.fromarray(scene(96, 64, 2)), Image.fromarray(scene(97, 64, 3))
    det = Detections(np.array([[0, 0, 20, 20]], np.float32), np.array([0.5], np.float32), ["cat"])
    mask = np.zeros((64, 96), bool)
    mask[20:40, 30:60] = True
    grounder = Grounder(FixedDetector([det], fail_on={97}), FixedSegmenter(mask), 0.25, 0.25, 4, 64)
    jobs = [make_job(nouns_row(i, ["cat"]), im, "ok", "") for i, im in (("a", ok_image), ("b", bad_image))]
    rows = grounder.run(jobs)
    assert [r["status"] for r in rows] == ["ok", "inference_failed"]
    assert rows[1]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert rows[1]["mask"] is None and rows[1]["token_indices"] == [2]
    assert grounder.detector.calls == [["cat.", "cat."], ["cat."], ["cat."]]  # the batch, then each image alone


def test_failing_image_in_a_batch_of_one_is_recorded_not_raised():
    image = Image.fromarray(scene(97, 64, 3))
    det = Detections(np.array([[0, 0, 20, 20]], np.float32), np.array([0.5], np.float32), ["cat"])
    grounder = Grounder(FixedDetector([det], fail_on={97}), FixedSegmenter(np.ones((64, 97), bool)), 0.25, 0.25, 1, 64)
    jobs = [make_job(nouns_row("b", ["cat", "dog"]), image, "ok", ""), make_job(nouns_row("c", []), None, "ok", "")]
    rows = grounder.run(jobs)
    assert [(r["image_id"], r["phrase"], r["status"]) for r in rows] == [
        ("b", "cat", "inference_failed"), ("b", "dog", "inference_failed"), ("c", "", "no_phrases")]
    assert {r["error"] for r in rows[:2]} == {"RuntimeError: CUDA out of memory (simulated)"}
    assert len(grounder.detector.calls) == 1  # the job without phrases never reaches the models


# --- import graph: what each stage's code digest and DVC deps cover -------------------------------

def _closure(root: str | Path) -> set[str]:
    from pipeline.store.identity import import_closure

    return {p.relative_to(REPO).as_posix() for p in import_closure(root)}


MASKS_STAGE_ONLY = {"pipeline/masks/grounded_sam.py", "pipeline/masks/authors.py", "pipeline/masks/overlay.py",
                    "pipeline/masks/summary.py", "pipeline/masks/inputs.py"}


def test_grounding_eval_imports_the_models_but_not_the_masks_stage_writers():
    closure = _closure(REPO / "stages/grounding_eval.py")
    assert {"pipeline/masks/jobs.py", "pipeline/masks/models.py", "pipeline/masks/labels.py",
            "pipeline/masks/params.py", "pipeline/masks/rows.py"} <= closure
    assert not closure & (MASKS_STAGE_ONLY | {"pipeline/grounding.py"})


def test_make_job_does_not_import_model_loading():
    """``pipeline.attention_maps`` needs ``make_job``: its module must not pull Grounding DINO / SAM loading."""
    closure = _closure("pipeline.masks.jobs")
    assert {"pipeline/masks/labels.py", "pipeline/masks/rows.py"} <= closure
    assert not closure & (MASKS_STAGE_ONLY | {"pipeline/masks/models.py", "pipeline/masks/params.py"})


def test_each_mask_source_digest_covers_only_its_own_code():
    grounded = _closure("pipeline.masks.grounded_sam")
    assert {"pipeline/masks/jobs.py", "pipeline/masks/models.py", "pipeline/masks/labels.py", "pipeline/masks/rows.py",
            "pipeline/masks/params.py", "pipeline/masks/inputs.py", "pipeline/geometry.py"} <= grounded
    assert not grounded & {"pipeline/masks/authors.py", "pipeline/masks/overlay.py", "pipeline/masks/summary.py"}
    authors = _closure("pipeline.masks.authors")
    assert {"pipeline/masks/rows.py", "pipeline/masks/inputs.py", "pipeline/geometry.py"} <= authors
    assert not authors & {"pipeline/masks/jobs.py", "pipeline/masks/models.py", "pipeline/masks/labels.py",
                          "pipeline/masks/grounded_sam.py", "pipeline/masks/overlay.py", "pipeline/masks/summary.py"}


# --- geometry and RLE ------------------------------------------------------------------------------

def test_train_mask_is_aligned_with_the_cropped_image():
    width, height, res = 200, 120, 64
    pixels = np.zeros((height, width, 3), np.uint8)
    x0, y0, x1, y1 = 110, 20, 150, 90  # a rectangle right of centre, inside the crop
    pixels[y0:y1, x0:x1] = 255
    mask = pixels[..., 0] > 0
    small = geometry.train_mask(mask, res)
    cropped = np.asarray(geometry.resize_center_crop(Image.fromarray(pixels), res))
    assert small.shape == (res, res) and cropped.shape == (res, res, 3)
    assert np.array_equal(small, cropped[..., 0] > 0)  # mask and image share the geometry
    # Independent: PIL resize to (int(64 * 200 / 120), 64) then crop the centre by hand.
    new_w = int(res * width / height)
    left = int(round((new_w - res) / 2.0))
    by_hand = np.asarray(Image.fromarray(pixels).resize((new_w, res), Image.BILINEAR))[:, left : left + res]
    assert np.array_equal(cropped, by_hand)
    scale = res / height
    ys, xs = np.nonzero(small)
    assert abs(xs.min() - (x0 * scale - left)) <= 1.5 and abs(xs.max() + 1 - (x1 * scale - left)) <= 1.5
    assert abs(ys.min() - y0 * scale) <= 1.5 and abs(ys.max() + 1 - y1 * scale) <= 1.5


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 48), (5, 200)])
def test_rle_round_trip_through_rows(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for mask in (rng.random(shape) > 0.6, np.zeros(shape, bool), np.ones(shape, bool)):
        rle = codecs.rle_encode(mask)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        assert np.array_equal(codecs.rle_decode(json.loads(json.dumps(rle))), mask)


# --- models against the libraries called directly --------------------------------------------------

def test_detector_matches_transformers_called_directly(tiny_refs):
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    det_ref, _, models_dir = tiny_refs
    detector = GroundingDetector.load(det_ref, models_dir, torch.device("cpu"), torch.float32)
    images = [Image.fromarray(scene(128, 96, s)) for s in (4, 5)]  # same size: no padding in the batch
    prompts = [build_prompt(["car", "teddy bear"]), build_prompt(["man", "woman", "table"])]
    batched = detector.detect(images, prompts, 0.25, 0.25)
    path = models_dir / "tiny-grounding-dino"
    processor, model = AutoProcessor.from_pretrained(path), GroundingDinoForObjectDetection.from_pretrained(path).eval()
    for image, prompt, got in zip(images, prompts, batched):
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
        ref = processor.post_process_grounded_object_detection(out, inputs.input_ids, threshold=0.25,
                                                               text_threshold=0.25, target_sizes=[(96, 128)])[0]
        assert len(ref["scores"]) > 0, "the tiny model should detect something at the paper thresholds"
        np.testing.assert_allclose(got.boxes, ref["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(got.scores, ref["scores"].numpy(), atol=1e-4)
        assert got.labels == list(ref["text_labels"])


def _direct_sam(model, processor, image, boxes):
    inputs = processor(images=image, input_boxes=[[list(map(float, b)) for b in boxes]], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"].float(),
                    multimask_output=False)
    return processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0][:, 0]


def _assert_masks_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.mean(a != b) <= 1e-3  # batched vs single float rounding may flip a rare boundary pixel


def test_sam_batched_matches_transformers_called_directly(tiny_refs):
    from transformers import AutoProcessor, SamModel

    _, seg_ref, models_dir = tiny_refs
    segmenter = load_segmenter(seg_ref, models_dir, torch.device("cpu"), torch.float32)
    images = [Image.fromarray(scene(128, 96, 6)), Image.fromarray(scene(80, 120, 7)), Image.fromarray(scene(64, 64, 8))]
    boxes = [np.array([[5, 5, 60, 60], [30, 10, 120, 90], [0, 0, 128, 96]], np.float32),
             np.array([[10, 20, 70, 100]], np.float32), np.zeros((0, 4), np.float32)]
    masks = segmenter.segment(images, boxes)
    assert masks[2].shape == (0, 64, 64)
    path = models_dir / "tiny-sam"
    model, processor = SamModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    for image, b, got in zip(images[:2], boxes[:2], masks[:2]):
        assert got.shape == (len(b), image.height, image.width)
        _assert_masks_close(got, _direct_sam(model, processor, image, b).numpy())


def test_sam_hq_folder_loads_through_the_same_path(tmp_path, tiny_refs):
    from transformers import AutoProcessor, SamHQConfig, SamHQModel

    from pipeline.zoo import grounding as zg

    torch.manual_seed(0)
    config = SamHQConfig(vision_config=zg.TINY_SAM_VISION, prompt_encoder_config=zg.TINY_SAM_PROMPT,
                         mask_decoder_config={**zg.TINY_SAM_DECODER, "vit_dim": zg.TINY_SAM_VISION["hidden_size"]})
    SamHQModel(config).eval().save_pretrained(tmp_path / "hq")
    zg.sam_processor(zg.TINY_SAM_IMAGE).save_pretrained(tmp_path / "hq")
    segmenter = load_segmenter(str(tmp_path / "hq"), tmp_path, torch.device("cpu"), torch.float32)
    assert type(segmenter.model).__name__ == "SamHQModel"
    image, boxes = Image.fromarray(scene(100, 80, 9)), np.array([[10, 10, 60, 70], [0, 0, 99, 79]], np.float32)
    got = segmenter.segment([image], [boxes])[0]
    model, processor = SamHQModel.from_pretrained(tmp_path / "hq").eval(), AutoProcessor.from_pretrained(tmp_path / "hq")
    _assert_masks_close(got, _direct_sam(model, processor, image, boxes).numpy())


def tiny_segment_anything_sam():
    """A small ``segment_anything.modeling.Sam`` (64 px, width 32) with default random init."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    encoder = ImageEncoderViT(depth=1, embed_dim=32, img_size=64, mlp_ratio=2.0, num_heads=2, patch_size=16,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
                              global_attn_indexes=[0], window_size=2, out_chans=32)
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2))
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


def test_pth_checkpoint_matches_sam_predictor(tmp_path, monkeypatch):
    import segment_anything
    from segment_anything import SamPredictor

    torch.manual_seed(0)
    reference = tiny_segment_anything_sam()
    path = tmp_path / "tiny_vit_b.pth"
    torch.save(reference.state_dict(), path)
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_segment_anything_sam())
    segmenter = load_segmenter(str(path), tmp_path, torch.device("cpu"), torch.float32)
    images = [Image.fromarray(scene(90, 60, 10)), Image.fromarray(scene(50, 70, 11))]
    boxes = [np.array([[5, 5, 50, 40], [20, 10, 89, 59]], np.float32), np.array([[0, 0, 30, 60]], np.float32)]
    masks = segmenter.segment(images, boxes)
    predictor = SamPredictor(reference)
    for image, b, got in zip(images, boxes, masks):
        predictor.set_image(np.asarray(image))
        for k, box in enumerate(b):
            ref, _, _ = predictor.predict(box=box, multimask_output=False)
            _assert_masks_close(got[k], ref[0])


def test_pth_checkpoint_in_half_precision_runs_and_agrees_with_float32(tmp_path):
    """Half precision (float16 on CUDA; bfloat16 here, where CPU autocast supports it) must not break
    segment_anything's float32 positional encodings; masks agree with float32 almost everywhere."""
    torch.manual_seed(0)
    sam = tiny_segment_anything_sam()
    images = [Image.fromarray(scene(90, 60, 10)), Image.fromarray(scene(50, 70, 11))]
    boxes = [np.array([[5, 5, 50, 40], [20, 10, 89, 59]], np.float32), np.array([[0, 0, 30, 60]], np.float32)]
    full = SegmentAnythingSegmenter(sam, torch.device("cpu"), torch.float32).segment(images, boxes)
    half = SegmentAnythingSegmenter(sam, torch.device("cpu"), torch.bfloat16).segment(images, boxes)
    for a, b in zip(full, half):
        assert a.shape == b.shape and (a == b).mean() > 0.98


def test_sam_hq_pth_is_refused_with_the_folder_to_use(tmp_path):
    path = tmp_path / "sam_hq_vit_h.pth"
    torch.save({"mask_decoder.hf_token.weight": torch.zeros(1, 4)}, path)
    with pytest.raises(ValueError, match="SAM-HQ checkpoint.*sam-hq-vit-huge"):
        SegmentAnythingSegmenter.load(path, torch.device("cpu"), torch.float32)


def test_sam_variant_from_name_or_width():
    assert sam_variant("sam_vit_h_4b8939.pth", {}) == "vit_h"
    width = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}
    assert sam_variant("checkpoint.pth", width) == "vit_l"
    with pytest.raises(ValueError, match="not a segment-anything SAM checkpoint"):
        sam_variant("other.pth", {})


# --- the stage driver: statuses, resume ------------------------------------------------------------

def test_each_bad_input_gets_its_status(tmp_path, tiny_refs):
    det_ref, seg_ref, models_dir = tiny_refs
    ok_png = codecs.png_bytes(scene(128, 96, 12))
    images = [image_row("good", ok_png), image_row("failed", None, status="download_error"),
              image_row("corrupt", b"\x89PNG not really"), image_row("nophr", ok_png), image_row("mixed", ok_png)]
    nouns = [nouns_row("good", ["car", "table"]), nouns_row("failed", ["car"]), nouns_row("corrupt", ["car"]),
             nouns_row("absent", ["car"]), nouns_row("nophr", []),
             nouns_row("mixed", ["car", "", "kite"], ["ok", "ok", "past_context"])]
    write_inputs(tmp_path, images, nouns)
    ctx = RunContext(tmp_path / "masks", tmp_path / "artifacts/nouns", tmp_path / "artifacts/data/images", models_dir, 64)
    scale = scale_for(det_ref, seg_ref)
    write_grounded_masks(ctx, GroundingCfg(1.01, 0.25, 0.5), scale)  # nothing passes 1.01
    rows = shards.read_shards(ctx.out_dir)
    got = {(r.image_id, r.phrase): r.status for r in rows.itertuples()}
    assert got == {
        ("good", "car"): "no_detection", ("good", "table"): "no_detection", ("failed", "car"): "missing_image",
        ("corrupt", "car"): "corrupt_image", ("absent", "car"): "missing_image", ("nophr", ""): "no_phrases",
        ("mixed", "car"): "no_detection", ("mixed", ""): "empty_phrase", ("mixed", "kite"): "not_aligned",
    }
    assert rows.loc[rows.phrase == "kite", "error"].item() == "reason past_context"
    assert "download_error" in rows.loc[rows.image_id == "failed", "error"].item()
    assert rows.loc[(rows.image_id == "mixed") & (rows.phrase == "kite"), "token_indices"].item().tolist() == []
    metrics = summarize(rows.to_dict("records"))
    assert metrics["status_missing_image"] == 2 and metrics["input_errors"] == 3 and metrics["images"] == 6
    with pytest.raises(FailureRateError, match="max_input_error_rate"):
        check_input_errors(metrics, 0.2)


def test_demo_thresholds_give_some_masks_with_train_masks(tmp_path, tiny_refs):
    det_ref, seg_ref, models_dir = tiny_refs
    images, nouns = good_inputs(6)
    write_inputs(tmp_path, images, nouns)
    ctx = RunContext(tmp_path / "masks", tmp_path / "artifacts/nouns", tmp_path / "artifacts/data/images", models_dir, 64)
    write_grounded_masks(ctx, GroundingCfg(0.25, 0.25, 0.5), scale_for(det_ref, seg_ref))
    rows = shards.read_shards(ctx.out_dir)
    assert len(rows) == sum(len(n["phrases"]) for n in nouns)
    ok = rows[rows.status == "ok"]
    assert 0 < len(ok) < len(rows)  # a deterministic mix of detections and misses
    for r in ok.itertuples():
        full = codecs.rle_decode(r.mask)
        size = next(Image.open(io.BytesIO(i["image"])).size for i in images if i["image_id"] == r.image_id)
        assert full.shape == (size[1], size[0])
        assert np.array_equal(codecs.rle_decode(r.train_mask), geometry.train_mask(full, 64))
        assert len(r.box) == 4 and 0.25 < r.score <= 1.0
    out = tmp_path / "overlay.png"
    loaded = ImageStore(ctx.images_dir).load(ok.image_id)
    assert plot_overlay(rows.to_dict("records"), {k: v[0] for k, v in loaded.items()}, out, 2) == 2
    assert Image.open(out).size[0] > 100


def test_a_model_that_does_not_load_loses_no_finished_masks(tmp_path, tiny_refs, monkeypatch):
    """Models load before stale shards are dropped: a mistyped reference leaves the finished run intact."""
    det_ref, seg_ref, models_dir = tiny_refs
    images, nouns = good_inputs(4)
    write_inputs(tmp_path, images, nouns)
    ctx = RunContext(tmp_path / "masks", tmp_path / "artifacts/nouns", tmp_path / "artifacts/data/images", models_dir, 64)
    cfg = GroundingCfg(0.25, 0.25, 0.5)
    write_grounded_masks(ctx, cfg, scale_for(det_ref, seg_ref))
    finished = {p.name: p.read_bytes() for p in shards.shard_files(ctx.out_dir)}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(Exception, match="syscv-community/sam-hq-vit-hug"):  # a hub id, not in the cache
        write_grounded_masks(ctx, cfg, scale_for(det_ref, "syscv-community/sam-hq-vit-hug"))
    assert {p.name: p.read_bytes() for p in shards.shard_files(ctx.out_dir)} == finished


def test_models_are_loaded_only_when_a_shard_is_pending(tmp_path, tiny_refs, monkeypatch):
    """A rerun with every shard written does not load Grounding DINO or SAM; a missing shard does."""
    det_ref, seg_ref, models_dir = tiny_refs
    images, nouns = good_inputs(4)
    write_inputs(tmp_path, images, nouns)
    ctx = RunContext(tmp_path / "masks", tmp_path / "artifacts/nouns", tmp_path / "artifacts/data/images", models_dir, 64)
    cfg, scale = GroundingCfg(0.25, 0.25, 0.5), scale_for(det_ref, seg_ref)
    write_grounded_masks(ctx, cfg, scale)
    finished = {p.name: p.read_bytes() for p in shards.shard_files(ctx.out_dir)}
    loads = []
    real_load = GroundingDetector.load
    monkeypatch.setattr(GroundingDetector, "load",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or real_load(*a, **k)))
    write_grounded_masks(ctx, cfg, scale)
    assert loads == [] and {p.name: p.read_bytes() for p in shards.shard_files(ctx.out_dir)} == finished
    shards.shard_files(ctx.out_dir)[-1].unlink()
    write_grounded_masks(ctx, cfg, scale)
    assert loads == [det_ref] and {p.name: p.read_bytes() for p in shards.shard_files(ctx.out_dir)} == finished


def test_ranks_split_shards_and_together_equal_one_process(tmp_path, tiny_refs):
    det_ref, seg_ref, models_dir = tiny_refs
    images, nouns = good_inputs(5)
    write_inputs(tmp_path, images, nouns)
    cfg, scale = GroundingCfg(0.25, 0.25, 0.5), scale_for(det_ref, seg_ref)
    paths = dict(nouns_dir=tmp_path / "artifacts/nouns", images_dir=tmp_path / "artifacts/data/images",
                 models_dir=models_dir, resolution=64)
    single = write_grounded_masks(RunContext(tmp_path / "one", **paths), cfg, scale)
    mine = [write_grounded_masks(RunContext(tmp_path / "two", rank=r, world_size=2, **paths), cfg, scale)
            for r in (0, 1)]
    assert [p.name for p in mine[0]] == ["part-00000.parquet", "part-00002.parquet"]
    assert [p.name for p in mine[1]] == ["part-00001.parquet"]
    for p in single:
        assert p.read_bytes() == (tmp_path / "two" / p.name).read_bytes()


def test_rerun_retries_images_whose_inference_failed(tmp_path, tiny_refs, monkeypatch):
    """An image whose inference raised (out of memory) is recorded, and the next run computes its shard again."""
    det_ref, seg_ref, models_dir = tiny_refs
    images, nouns = good_inputs(3)  # widths 96, 128, 112; shards of 2 images
    write_inputs(tmp_path, images, nouns)
    cfg, scale = GroundingCfg(0.25, 0.25, 0.5), scale_for(det_ref, seg_ref)
    paths = dict(nouns_dir=tmp_path / "artifacts/nouns", images_dir=tmp_path / "artifacts/data/images",
                 models_dir=models_dir, resolution=64)
    ctx = RunContext(tmp_path / "masks", **paths)
    real_detect = GroundingDetector.detect

    def out_of_memory_on_img1(self, images, *args, **kwargs):
        if any(im.width == 128 for im in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_detect(self, images, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(GroundingDetector, "detect", out_of_memory_on_img1)
        write_grounded_masks(ctx, cfg, scale)
    first = shards.read_shards(ctx.out_dir)
    assert set(first[first.status == "inference_failed"].image_id) == {"img1"}
    untouched = shards.shard_path(ctx.out_dir, 1).read_bytes()
    write_grounded_masks(ctx, cfg, scale)
    reference = write_grounded_masks(RunContext(tmp_path / "reference", **paths), cfg, scale)
    assert "inference_failed" not in set(shards.read_shards(ctx.out_dir).status)
    assert [p.read_bytes() for p in reference] == [p.read_bytes() for p in shards.shard_files(ctx.out_dir)]
    assert shards.shard_path(ctx.out_dir, 1).read_bytes() == untouched  # the shard without failures is kept


STAGE_PARAMS = """
profile: demo
seed: 0
grounding: {box_threshold: 0.25, text_threshold: 0.25, max_input_error_rate: 0.5}
profiles:
  demo:
    resolution: 64
    masks: {source: grounded_sam, detector: "embedded:tiny-grounding-dino", segmenter: "embedded:tiny-sam",
            batch_size: 2, shard_size: 1, dtype: auto, overlay_images: 2}
"""

STAGE_RUNNER = """
import os, sys, time, runpy
from pipeline.masks.jobs import Grounder
if os.environ.get("SLOW_SHARDS") and os.environ.get("RANK", "0") in os.environ.get("SLOW_RANKS", "0").split(","):
    original = Grounder.run
    def slow(self, jobs):
        time.sleep(float(os.environ["SLOW_SHARDS"]))
        return original(self, jobs)
    Grounder.run = slow
script = sys.argv.pop(1)  # the stage script sees its own command line, as under dvc
runpy.run_path(script, run_name="__main__")
"""


def make_project(root: Path, models_dir: Path, n: int) -> Path:
    """A folder with params.yaml, artifacts/{nouns,data/images,models} for the stage script."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(STAGE_PARAMS)
    images, nouns = good_inputs(n)
    write_inputs(root, images, nouns)
    (root / "artifacts/models").mkdir(parents=True)
    for name in ("tiny-grounding-dino", "tiny-sam"):
        os.symlink(models_dir / name, root / "artifacts/models" / name)
    (root / "runner.py").write_text(STAGE_RUNNER)
    return root


def run_stage(root: Path, slow: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLOW_SHARDS": str(slow) if slow else ""}
    return subprocess.Popen([sys.executable, "runner.py", str(REPO / "stages/masks.py")], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def test_stage_resumes_after_kill_with_identical_shards(tmp_path, tiny_refs):
    _, _, models_dir = tiny_refs
    n = 8
    reference, killed = make_project(tmp_path / "ref", models_dir, n), make_project(tmp_path / "kill", models_dir, n)
    proc = run_stage(reference)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    proc = run_stage(killed, slow=0.5)
    out = killed / "artifacts/masks"
    deadline = time.time() + 240
    while not shards.shard_path(out, 2).exists():
        assert proc.poll() is None and time.time() < deadline, "stage ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 3 <= len(done) < n
    proc = run_stage(killed)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in done} == done
    ref_files = sorted((reference / "artifacts/masks").glob("part-*.parquet"))
    assert [p.name for p in ref_files] == sorted(p.name for p in out.glob("part-*.parquet"))
    for ref in ref_files:
        pd.testing.assert_frame_equal(pd.read_parquet(ref), pd.read_parquet(out / ref.name))
        assert ref.read_bytes() == (out / ref.name).read_bytes()
    assert not list(out.glob(".tmp-*"))
    metrics = json.loads((killed / "metrics/masks.json").read_text())
    assert metrics == json.loads((reference / "metrics/masks.json").read_text())
    assert metrics["rows"] == sum(len(n["phrases"]) for n in good_inputs(n)[1]) and metrics["box_threshold"] == 0.25
    assert (killed / "plots/masks_overlay.png").is_file()


def test_stage_under_two_processes_equals_one_process(tmp_path, tiny_refs):
    """torchrun with two CPU ranks (gloo): the ranks split the shards, rank 0 waits for rank 1 (slowed down)
    before it reads all shards, and shards and metrics equal a one-process run's."""
    _, _, models_dir = tiny_refs
    one, two = make_project(tmp_path / "one", models_dir, 6), make_project(tmp_path / "two", models_dir, 6)
    proc = run_stage(one)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SLOW_SHARDS": "1.0", "SLOW_RANKS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "runner.py",
           str(REPO / "stages/masks.py")]
    done = subprocess.run(cmd, cwd=two, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.name for p in (one / "artifacts/masks").glob("part-*.parquet"))
    assert files == sorted(p.name for p in (two / "artifacts/masks").glob("part-*.parquet")) and len(files) == 6
    for name in files:
        assert (one / "artifacts/masks" / name).read_bytes() == (two / "artifacts/masks" / name).read_bytes()
    m1, m2 = (json.loads((root / "metrics/masks.json").read_text()) for root in (one, two))
    assert m2.pop("world_size") == 2 and m1.pop("world_size") == 1
    assert m1 == m2


def test_stage_refuses_authors_masks_on_tagger_phrases(tmp_path, tiny_refs):
    """masks.source: authors with phrases from the tagger would lose the authors' words the tagger missed."""
    root = make_project(tmp_path / "p", tiny_refs[2], 2)
    params = yaml.safe_load(STAGE_PARAMS)
    params["profiles"]["demo"]["masks"].update(source="authors", authors_metadata="m.jsonl", authors_masks="seg")
    params["profiles"]["demo"]["text"] = {"phrases": "tagger"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_stage(root)
    assert proc.wait(timeout=300) != 0
    assert "masks.source: authors needs profiles.demo.text.phrases: authors" in proc.stderr.read().decode()


# --- the authors' released masks -------------------------------------------------------------------

def test_authors_masks_read_into_the_same_rows(tmp_path, shared_data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = (shared_data / "tokencompose/coco_gsam_metadata.jsonl").read_text().splitlines()[:6]
    entries = [json.loads(line) for line in lines]
    masks_dir, rng, truth = tmp_path / "coco_gsam_seg", np.random.default_rng(0), {}
    for e in entries:
        for word, path in e["attn_list"]:
            if path is None:
                continue
            mask = np.zeros((48, 72), bool)
            y, x = rng.integers(0, 30), rng.integers(0, 50)
            mask[y : y + 15, x : x + 20] = True
            target = authors_mask_path(path, masks_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            plt.imsave(target, mask, cmap="gray")  # how gen_mask.py wrote them (RGBA)
            truth[(Path(e["file_name"]).stem, word)] = mask
    first = entries[0]  # 000000000142: 7 words with masks
    stem = Path(first["file_name"]).stem
    plt.imsave(authors_mask_path(first["attn_list"][0][1], masks_dir), np.ones((48, 72), bool), cmap="gray")
    authors_mask_path(first["attn_list"][1][1], masks_dir).unlink()
    authors_mask_path(first["attn_list"][2][1], masks_dir).write_bytes(b"not a png")
    assert Image.open(authors_mask_path(first["attn_list"][3][1], masks_dir)).mode == "RGBA"
    metadata = tmp_path / "metadata.jsonl"
    bad_pair = json.dumps({"file_name": "x.jpg", "text": "A cat.", "attn_list": [["cat"]]})
    metadata.write_text("\n".join(lines) + "\n{broken json\n" + bad_pair + "\n")
    nouns = [nouns_row(Path(e["file_name"]).stem, [w for w, _ in e["attn_list"]]) for e in entries]
    nouns[0]["phrase_status"][4] = "past_context"
    shards.write_shards(tmp_path / "nouns", nouns, lambda c: c, 4, "fixture", code="test")
    ctx = RunContext(tmp_path / "masks", tmp_path / "nouns", tmp_path / "images", tmp_path, 64)
    scale = scale_for("unused", "unused", source="authors", authors_metadata=str(metadata), authors_masks=str(masks_dir))
    write_authors_masks(ctx, scale)
    rows = shards.read_shards(ctx.out_dir)
    assert len(rows) == sum(len(e["attn_list"]) for e in entries) + 2
    status = {(r.image_id, r.phrase): r.status for r in rows.itertuples()}
    words = [w for w, _ in first["attn_list"]]
    assert [status[(stem, w)] for w in words[:5]] == ["blank_mask", "missing_mask_file", "corrupt_mask", "ok", "not_aligned"]
    assert status[("000000000370", "piece")] == "no_detection"  # null path in the metadata
    assert status[("line7", "")] == "bad_metadata" and status[("line8", "")] == "bad_metadata"
    assert "attn_list must be a list of [phrase, mask path or null] pairs" in rows[rows.image_id == "line8"].error.item()
    summary = summarize(rows.to_dict("records"))
    assert summary["input_errors"] == 4  # two bad lines, the missing and the corrupt mask file
    with pytest.raises(RuntimeError, match="4 of .* rows have a missing/corrupt image"):
        check_input_errors(summary, 0.05)
    for empty in ("authors_metadata", "authors_masks"):
        with pytest.raises(FileNotFoundError, match=f"masks.{empty} is empty"):
            write_authors_masks(ctx, dataclasses.replace(scale, **{empty: ""}))
    for r in rows[rows.status == "ok"].itertuples():
        mask = truth[(r.image_id, r.phrase)]
        assert np.array_equal(codecs.rle_decode(r.mask), mask)
        assert np.array_equal(codecs.rle_decode(r.train_mask), geometry.train_mask(mask, 64))
        assert list(r.token_indices) and r.box is None and pd.isna(r.score)


def test_authors_mask_path_drops_only_a_leading_seg():
    """SPEC §1.1 step 3 quirk fixed: the original replaced every "seg" substring, corrupting words like "segway"."""
    root = Path("/data/coco_gsam_seg")
    path = authors_mask_path("seg/000000000142/mask_000000000142_segway.png", root)
    assert path == root / "000000000142" / "mask_000000000142_segway.png"
    assert authors_mask_path("000000000142/mask_000000000142_cat.png", root) == (
        root / "000000000142" / "mask_000000000142_cat.png")


def test_authors_mask_path_outside_the_folder_is_refused(tmp_path):
    root = tmp_path / "coco_gsam_seg"
    (root / "000000000142").mkdir(parents=True)
    os.symlink(tmp_path, root / "000000000142" / "up")
    for path, rule in [("seg/../../secret.png", "parent_escape"), ("../secret.png", "parent_escape"),
                       ("/etc/passwd", "absolute_path"), ("/seg/000000000142/x.png", "absolute_path"),
                       ("seg/000000000142/up/secret.png", "symlink_escape"), ("seg/", "empty_name"), ("", "empty_name")]:
        with pytest.raises(UnsafePathError) as info:
            authors_mask_path(path, root)
        assert info.value.rule == rule, path
        assert repr(path) in str(info.value) and str(root) in str(info.value)


def test_authors_unsafe_mask_paths_become_rows_and_nothing_outside_is_read(tmp_path, monkeypatch):
    """Each hostile path gives an ``unsafe_mask_path`` row, counted as an input error; no file outside the
    mask folder is opened, even one that would decode as a valid mask."""
    masks_dir = tmp_path / "coco_gsam_seg"
    (masks_dir / "000000000001").mkdir(parents=True)
    good = np.zeros((40, 40), bool)
    good[10:30, 10:30] = True
    Image.fromarray(good.astype(np.uint8) * 255).save(masks_dir / "000000000001" / "mask_000000000001_cat.png")
    bait = tmp_path / "bait.png"
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(bait)
    os.symlink(bait, masks_dir / "000000000001" / "mask_000000000001_link.png")
    pairs = [["cat", "seg/000000000001/mask_000000000001_cat.png"], ["dog", "seg/../../bait.png"],
             ["cow", str(bait)], ["owl", "seg/000000000001/mask_000000000001_link.png"]]
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text(json.dumps({"file_name": "000000000001.jpg", "text": "A cat, a dog, a cow and an owl.",
                                    "attn_list": pairs}) + "\n")
    shards.write_shards(tmp_path / "nouns", [nouns_row("000000000001", [w for w, _ in pairs])], lambda c: c, 4,
                        "fixture", code="test")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(Path(fp).resolve()) or real_open(fp, *a, **k))
    ctx = RunContext(tmp_path / "masks", tmp_path / "nouns", tmp_path / "images", tmp_path, 32)
    write_authors_masks(ctx, scale_for("unused", "unused", source="authors", authors_metadata=str(metadata),
                                       authors_masks=str(masks_dir)))
    rows = shards.read_shards(ctx.out_dir)
    status = dict(zip(rows.phrase, rows.status))
    assert status == {"cat": "ok", "dog": "unsafe_mask_path", "cow": "unsafe_mask_path", "owl": "unsafe_mask_path"}
    errors = dict(zip(rows.phrase, rows.error))
    assert "parent_escape" in errors["dog"] and "absolute_path" in errors["cow"] and "symlink_escape" in errors["owl"]
    assert opened == [(masks_dir / "000000000001" / "mask_000000000001_cat.png").resolve()]
    summary = summarize(rows.to_dict("records"))
    assert summary["status_unsafe_mask_path"] == 3 and summary["input_errors"] == 3
    with pytest.raises(FailureRateError, match="3 of 4 rows .*unsafe mask path"):
        check_input_errors(summary, 0.05)


def test_a_phrase_repeated_in_other_case_is_usable_when_one_occurrence_aligned():
    """Record 000000481821 has "legs" and "Legs": one prompt phrase, grounded when either aligned."""
    job = make_job(nouns_row("r", ["legs", "Legs", "shoes"], ["ok", "not_in_caption", "past_context"]),
                             None, "ok", "")
    assert job.phrases == ["legs", "shoes"] and job.usable == [True, False]
    job = make_job(nouns_row("r", ["Legs", "legs"], ["not_in_caption", "ok"]), None, "ok", "")
    assert job.phrases == ["legs"] and job.usable == [True]


def test_imsave_writes_a_full_mask_black():
    """SPEC §2.7 quirk, checked against matplotlib itself: an all-True mask reads back all black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    plt.imsave(buf, np.ones((8, 8), bool), cmap="gray", format="png")
    pixels = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    assert pixels.shape == (8, 8, 4) and not pixels[..., 0].any()


def test_prefix_rule_needs_every_label_word():
    """Rule 4 (SPEC §2.6): every space-token of the label must be a substring of the word."""
    assert match_label("banana split", ["bananas"]) == (None, "unmatched_label")


IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.mark.parametrize("size", [(160, 120), (90, 200)])        # (width, height): landscape, portrait
def test_model_inputs_are_the_original_transforms(embedded, models_dir, size):
    """Grounding DINO's input is the original's PIL bilinear resize (shorter side to ``shortest_edge``, longer
    side capped at ``longest_edge``, sizes rounded as its ``get_size_with_aspect_ratio``), SAM's the PIL
    bilinear resize of the longer side (``ResizeLongestSide``); both then ImageNet-normalised."""
    w, h = size
    image = Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    embedded("tiny-grounding-dino"), embedded("tiny-sam")
    detector = GroundingDetector.load("embedded:tiny-grounding-dino", models_dir, torch.device("cpu"),
                                                torch.float32)
    proc = detector.processor.image_processor
    short, cap = proc.size.shortest_edge, proc.size.longest_edge
    if max(w, h) / min(w, h) * short > cap:
        short = int(round(cap * min(w, h) / max(w, h)))
    ow, oh = (short, int(short * h / w)) if w < h else (int(short * w / h), short)
    want = (np.asarray(image.resize((ow, oh), Image.BILINEAR)) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    got = proc(images=[image], return_tensors="pt")["pixel_values"][0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got[:oh, :ow], want, atol=1e-5)

    segmenter = HFSamSegmenter.load("embedded:tiny-sam", models_dir, torch.device("cpu"), torch.float32)
    proc = segmenter.processor.image_processor
    side = proc.size.longest_edge
    scale = side / max(w, h)
    ow, oh = int(w * scale + 0.5), int(h * scale + 0.5)
    want = (np.asarray(image.resize((ow, oh), Image.BILINEAR)) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    got = proc(images=[image], return_tensors="pt")["pixel_values"][0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got[:oh, :ow], want, atol=1e-5)
    assert np.abs(got[oh:, :]).max(initial=0) == 0 and np.abs(got[:, ow:]).max(initial=0) == 0   # zero padding
