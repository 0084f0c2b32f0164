"""Grounded-SAM phrase masks (SPEC §2.4-2.8) and the authors' released masks, as ``artifacts/masks/`` rows.

For each caption of ``artifacts/nouns/`` and its image in ``artifacts/data/images/``:

1. **Prompt** (:func:`build_prompt`): the phrases joined with ``" . "``, lower-cased, stripped, final ``"."``.
2. **Grounding DINO** (:class:`GroundingDetector`, transformers' ``GroundingDinoForObjectDetection``): a box
   is kept when its best token scores above ``box_threshold``; its label is the text of the tokens above
   ``text_threshold``, decoded by transformers' ``post_process_grounded_object_detection``; boxes in
   absolute xyxy pixels of the original image. No NMS. Batched over images (padded to the batch's
   largest image, as the processor does).
3. **Label -> phrase** (:func:`match_label`): the rules of SPEC §2.6 with three quirks fixed (see
   docs/grounding.md): word-level instead of character-substring matching ("man" never matches "woman"),
   empty labels skipped with a reason instead of going to the first phrase, and every box of a phrase
   unioned (the original kept the last label's mask only).
4. **SAM** (:class:`HFSamSegmenter` for ``SamModel``/``SamHQModel``, :class:`SegmentAnythingSegmenter` for
   Meta's ``.pth`` checkpoints): one mask per matched box (``multimask_output=False``) at the original
   image size, image encoder batched over images.
5. **Rows** (one per (image, phrase)): the union mask as COCO RLE at the original size, ``train_mask`` after
   the training image transform (:func:`resize_center_crop`: resize shorter side, bilinear, PIL; centre
   crop), binarised > 0; the enclosing box of the phrase's boxes; the best box score; a ``status`` from
   :data:`MASK_STATUSES` and an ``error`` message. Bad input never crashes the stage and never vanishes.

The authors' masks (``source: authors``, :func:`write_authors_masks`) become the same rows, so training
reads one format. Work is written in resumable shards (``pipeline.shards.write_shards``) and split by rank
under ``accelerate launch``.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError, DtypeName, Fraction, MissingInputError, NonNegativeInt, PositiveInt
from pipeline.store import shards
from pipeline.store.identity import code_digest, fingerprint_of
from pipeline.fetch import read_source
from pipeline.geometry import train_mask
from pipeline.metadata import read_records
from pipeline.models import from_pretrained, inference_dtype, parse_ref, resolve
from pipeline.runtime import FailureRateError
from pipeline.sequences import subsequence_starts
from pipeline.store.shards import STATUS_OK, write_shards
from pipeline.store.identity import dir_files, files_digest
from pipeline.store.codecs import image_from_bytes, rle_decode, rle_encode

log = logging.getLogger(__name__)

# Row statuses of artifacts/masks/ (``status`` column).
MASK_STATUSES = {
    STATUS_OK: "mask found; train_mask has at least one pixel",
    "missing_image": "no usable row for the image in artifacts/data/images (absent or failed)",
    "corrupt_image": "the image bytes do not decode",
    "no_phrases": "the caption has no noun phrase (one row with phrase '')",
    "empty_phrase": "the phrase is empty",
    "not_aligned": "the phrase has no CLIP token indices (artifacts/nouns phrase_status)",
    "no_detection": "no detected box matched the phrase (authors: their mask path is null)",
    "empty_mask": "the union of the phrase's SAM masks has no pixel",
    "outside_crop": "the mask lies outside the training centre crop (train_mask empty)",
    "inference_failed": "Grounding DINO or SAM raised on this image (message in error)",
    "missing_mask_file": "authors: the mask file does not exist",
    "corrupt_mask": "authors: the mask file does not decode",
    "blank_mask": "authors: the PNG is all black (empty, or whole-image: plt.imsave quirk, SPEC §1.6 item 7)",
    "bad_metadata": "authors: the metadata line is not valid JSON with file_name/text/attn_list",
}
INPUT_ERRORS = ("missing_image", "corrupt_image", "bad_metadata", "missing_mask_file", "corrupt_mask")


@dataclass(frozen=True)
class GroundingCfg:
    """Top-level ``grounding`` params (method hyperparameters, identical in every profile)."""

    box_threshold: Fraction  # keep a box when its best token's sigmoid passes this (SPEC §2.4: 0.25)
    text_threshold: Fraction  # tokens of a kept box above this form its label (SPEC §2.4: 0.25)
    max_input_error_rate: Fraction  # fail when more rows than this have bad input (INPUT_ERRORS)
    max_failed_rate: Fraction = 0.01  # fail when more rows than this are inference_failed (a rerun retries them)


@dataclass(frozen=True)
class MasksScale:
    """``profiles.<p>.masks`` params."""

    source: Literal["grounded_sam", "authors"]
    detector: str  # Grounding DINO reference (hub id, local dir, embedded:NAME)
    segmenter: str  # SAM / SAM-HQ reference, or a segment-anything ``.pth`` checkpoint
    batch_size: PositiveInt  # images per forward pass
    shard_size: PositiveInt  # captions per shard
    dtype: DtypeName  # auto: float16 on CUDA, float32 on CPU
    cpu_threads: NonNegativeInt  # torch intra-op threads when running on CPU (0: torch's default)
    overlay_images: NonNegativeInt  # images drawn in plots/masks_overlay.png
    authors_metadata: str = ""  # source authors: the authors' metadata.jsonl
    authors_masks: str = ""  # source authors: folder <img_id>/mask_<img_id>_<word>.png


# --- prompt and label matching ---------------------------------------------------------------------

def build_prompt(phrases: Sequence[str]) -> str:
    """Grounding DINO text prompt (SPEC §2.4): ``" . ".join(phrases)``, lower-cased, stripped, ending in ".".

    >>> build_prompt(["piece", "Plate", "chocolate spread"])
    'piece . plate . chocolate spread.'
    """
    prompt = " . ".join(phrases).lower().strip()
    return prompt if prompt.endswith(".") else prompt + "."


_SPECIAL = re.compile(r"\[(?:cls|sep|pad|unk|mask)\]")
_TOKEN = re.compile(r"\.|[^\s.]+")


def label_tokens(text: str) -> list[str]:
    """Words of a decoded label or phrase: lower-cased, BERT special tokens dropped, ``" - "`` joined to
    ``"-"`` (GroundingDINO decodes "coca-cola" as "coca - cola"), ``"."`` kept as a separator token."""
    text = _SPECIAL.sub(" ", text.lower())
    text = re.sub(r"\s*-\s*", "-", text)
    text = re.sub(r"\s*'\s*", "'", text)
    return _TOKEN.findall(text)


def _hyphen_parts(tokens: Sequence[str]) -> list[str]:
    """Tokens with hyphenated words split into their parts: ``["t-shirt", "."]`` -> ``["t", "shirt", "."]``."""
    return [part for token in tokens for part in token.split("-") if part] or list(tokens)


def _strip_dots(tokens: list[str]) -> list[str]:
    while tokens and tokens[0] == ".":
        tokens = tokens[1:]
    while tokens and tokens[-1] == ".":
        tokens = tokens[:-1]
    return tokens


def match_label(label: str, phrases: Sequence[str]) -> tuple[int | None, str]:
    """Index of the phrase a decoded box label belongs to, and the rule that fired (or the skip reason).

    Rules (first that fires; ties go to the earliest phrase, i.e. caption order):

    * ``"empty_label"`` (skip): the label has no word (``""``, ``"[SEP]"``, ``". ."``);
    * ``"exact"``: same words as the phrase (case, hyphen spacing and end dots ignored);
    * ``"contains"``: the phrase's words occur contiguously in the label (not across a ``"."``), or the
      label's words occur contiguously in the phrase; hyphenated words count as their parts here (a
      ``"shirt"`` label belongs to "t-shirt", ``"cola bottle"`` to "Coca-Cola bottle");
    * ``"prefix"``: every label word is a word of the phrase or the start of one (a word-piece label such
      as "banana" of "bananas");
    * ``"unmatched_label"`` (skip) otherwise.
    """
    tokens = _strip_dots(label_tokens(label))
    words = [t for t in tokens if t != "."]
    if not words:
        return None, "empty_label"
    targets = [[t for t in label_tokens(p) if t != "."] for p in phrases]
    for i, target in enumerate(targets):
        if target and target == tokens:
            return i, "exact"
    label_parts = _hyphen_parts(tokens)
    for i, target in enumerate(targets):
        parts = _hyphen_parts(target)
        inside_label = subsequence_starts(label_parts, parts)
        if inside_label or ("." not in tokens and subsequence_starts(parts, label_parts)):
            return i, "contains"
    for i, target in enumerate(targets):
        if target and all(any(t == w or t.startswith(w) for t in target) for w in words):
            return i, "prefix"
    return None, "unmatched_label"


# --- models ----------------------------------------------------------------------------------------

@dataclass
class Detections:
    """Grounding DINO output for one image: ``boxes`` (N, 4) xyxy pixels, ``scores`` (N,), ``labels``."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]


# Image processors run transformers' PIL implementation: PIL's bilinear resize, as the original Grounding DINO
# (torchvision transforms on PIL images) and SAM (``ResizeLongestSide`` through PIL) code. The library's
# default torchvision path differs from it by up to 0.0175 in Grounding DINO's normalised input.
IMAGE_BACKEND = "pil"


class GroundingDetector:
    """Grounding DINO (transformers) with its processor: batched detection with text prompts."""

    def __init__(self, processor: Any, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.processor, self.model, self.device, self.dtype = processor, model, torch.device(device), dtype

    @classmethod
    def load(cls, ref: str, models_dir: str | Path, device: torch.device, dtype: torch.dtype) -> "GroundingDetector":
        """Load ``GroundingDinoForObjectDetection`` + ``AutoProcessor`` from a model reference."""
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        processor = from_pretrained(AutoProcessor, ref, models_dir, backend=IMAGE_BACKEND)
        model = from_pretrained(GroundingDinoForObjectDetection, ref, models_dir, dtype=dtype)
        return cls(processor, model.to(device).eval(), device, dtype)

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image], prompts: Sequence[str], box_threshold: float,
               text_threshold: float) -> list[Detections]:
        """Detect in a batch: ``images`` (RGB, any sizes) with one prompt each -> one :class:`Detections` each."""
        inputs = self.processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device, self.dtype if v.is_floating_point() else None) for k, v in inputs.items()}
        outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        sizes = [(im.height, im.width) for im in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold, target_sizes=sizes)
        return [Detections(r["boxes"].cpu().numpy().reshape(-1, 4), r["scores"].cpu().numpy(), list(r["text_labels"]))
                for r in results]


class HFSamSegmenter:
    """transformers ``SamModel`` / ``SamHQModel``: box prompts -> one mask per box at the original size."""

    def __init__(self, processor: Any, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.processor, self.model, self.device, self.dtype = processor, model, torch.device(device), dtype

    @classmethod
    def load(cls, ref: str, models_dir: str | Path, device: torch.device, dtype: torch.dtype) -> "HFSamSegmenter":
        """Load SAM (``model_type: sam``) or SAM-HQ (``sam_hq``) with its processor."""
        from transformers import AutoConfig, AutoProcessor, SamHQModel, SamModel

        config = from_pretrained(AutoConfig, ref, models_dir)
        model_cls = SamHQModel if config.model_type == "sam_hq" else SamModel
        model = from_pretrained(model_cls, ref, models_dir, dtype=dtype)
        processor = from_pretrained(AutoProcessor, ref, models_dir, backend=IMAGE_BACKEND)
        return cls(processor, model.to(device).eval(), device, dtype)

    @torch.inference_mode()
    def segment(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Masks for ``boxes[i]`` ((N_i, 4) xyxy pixels) on ``images[i]`` -> (N_i, H_i, W_i) bool each.

        The image encoder runs once on all images with boxes; box lists are padded to the longest with a
        dummy box whose mask is dropped (boxes never interact in SAM's decoder).
        """
        out = [np.zeros((0, im.height, im.width), bool) for im in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        if not todo:
            return out
        longest = max(len(boxes[i]) for i in todo)
        padded = [[list(map(float, b)) for b in boxes[i]] + [[0.0, 0.0, 1.0, 1.0]] * (longest - len(boxes[i]))
                  for i in todo]
        inputs = self.processor(images=[images[i] for i in todo], input_boxes=padded, return_tensors="pt")
        pred = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                          input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
                          multimask_output=False).pred_masks
        masks = self.processor.post_process_masks(pred.float(), inputs["original_sizes"], inputs["reshaped_input_sizes"])
        for j, i in enumerate(todo):
            out[i] = masks[j][: len(boxes[i]), 0].cpu().numpy().astype(bool)
        return out


class SegmentAnythingSegmenter:
    """Meta's ``segment_anything`` ``Sam`` (original ``.pth`` checkpoints), batched like ``SamPredictor``."""

    def __init__(self, sam: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        """``dtype`` below float32 runs the model under autocast; its weights stay float32, because
        ``segment_anything`` builds its positional-encoding grids and box coordinates in float32."""
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam, self.device, self.dtype = sam.to(device).float().eval(), torch.device(device), dtype
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    @classmethod
    def load(cls, path: str | Path, device: torch.device, dtype: torch.dtype) -> "SegmentAnythingSegmenter":
        """Build ``sam_model_registry[variant]`` and load the checkpoint (``weights_only=True``).

        The variant (vit_h / vit_l / vit_b) comes from the file name, else from the encoder width.
        """
        from segment_anything import sam_model_registry

        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"{path}: SAM checkpoint not found; download it (e.g. sam_vit_h_4b8939.pth)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "sam_hq" in path.name or any(".hf_token." in k or "compress_vit_feat" in k for k in state):
            raise ConfigError(f"{path}: a SAM-HQ checkpoint, which segment_anything cannot load; give the "
                              f"transformers SAM-HQ folder or hub id instead (e.g. syscv-community/sam-hq-vit-huge)")
        variant = sam_variant(path.name, state)
        sam = sam_model_registry[variant]()
        sam.load_state_dict(state)
        return cls(sam, device, dtype)

    @torch.inference_mode()
    def segment(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Same contract as :meth:`HFSamSegmenter.segment`; steps of ``SamPredictor.set_image`` +
        ``predict_torch(boxes=..., multimask_output=False)`` with the encoder batched."""
        out = [np.zeros((0, im.height, im.width), bool) for im in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        if not todo:
            return out
        batch, input_sizes = [], []
        for i in todo:
            resized = self.transform.apply_image(np.asarray(images[i].convert("RGB")))
            input_sizes.append(resized.shape[:2])
            tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
            batch.append(self.sam.preprocess(tensor.float()))
        half = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=half):
            embeddings = self.sam.image_encoder(torch.cat(batch))
            dense_pe = self.sam.prompt_encoder.get_dense_pe()
            for j, i in enumerate(todo):
                size = (images[i].height, images[i].width)
                box = torch.as_tensor(boxes[i], dtype=torch.float32, device=self.device)
                sparse, dense = self.sam.prompt_encoder(points=None, boxes=self.transform.apply_boxes_torch(box, size),
                                                        masks=None)
                low_res, _ = self.sam.mask_decoder(image_embeddings=embeddings[j : j + 1], image_pe=dense_pe,
                                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                   multimask_output=False)
                masks = self.sam.postprocess_masks(low_res.float(), input_sizes[j], size) > self.sam.mask_threshold
                out[i] = masks[:, 0].cpu().numpy()
        return out


SAM_WIDTHS = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}


def sam_variant(file_name: str, state: dict[str, torch.Tensor]) -> str:
    """``vit_h`` / ``vit_l`` / ``vit_b`` from a checkpoint's file name or its patch-embedding width."""
    named = re.search(r"vit_([hlb])", file_name)
    if named:
        return f"vit_{named.group(1)}"
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None or int(weight.shape[0]) not in SAM_WIDTHS:
        raise ConfigError(f"{file_name}: not a segment-anything SAM checkpoint (no known image_encoder width); "
                          f"name it sam_vit_h/l/b_*.pth")
    return SAM_WIDTHS[int(weight.shape[0])]


def load_segmenter(ref: str, models_dir: str | Path, device: torch.device, dtype: torch.dtype):
    """A segmenter for ``ref`` in ``dtype``: a ``.pth`` file -> :class:`SegmentAnythingSegmenter`, else
    transformers SAM."""
    if ref.endswith(".pth"):
        return SegmentAnythingSegmenter.load(ref, device, dtype)
    return HFSamSegmenter.load(ref, models_dir, device, dtype)


# --- one caption -> rows ---------------------------------------------------------------------------

@dataclass
class Job:
    """One nouns row with its image: the phrases to ground and what is already known about them."""

    item: dict[str, Any]
    image: Image.Image | None = None
    status: str = STATUS_OK  # image status: ok, missing_image, corrupt_image
    error: str = ""
    phrases: list[str] = field(default_factory=list)  # unique non-empty phrases in caption order (the prompt)
    usable: list[bool] = field(default_factory=list)  # per unique phrase: some row with it is aligned

    @property
    def needs_inference(self) -> bool:
        return self.status == STATUS_OK and any(self.usable)


def _row(item: dict[str, Any], phrase: str, indices: Sequence[int], status: str, error: str = "",
         **fields: Any) -> dict[str, Any]:
    row = dict(image_id=str(item["image_id"]), caption=item.get("caption"), phrase=phrase,
               token_indices=[int(i) for i in indices], mask=None, train_mask=None, box=None, score=None,
               status=status, error=error)
    row.update(fields)
    return row


def _phrase_entries(item: dict[str, Any]) -> list[tuple[str, list[int], str, str]]:
    """(phrase, token_indices, phrase_status, phrase_error) of a nouns row, tolerating missing columns."""
    def column(name: str, default: list[Any]) -> list[Any]:
        value = item.get(name)
        return default if value is None else list(value)  # lists, or arrays when read through pandas

    phrases = column("phrases", [])
    n = len(phrases)
    indices = column("token_indices", [[]] * n)
    status = column("phrase_status", [STATUS_OK] * n)
    errors = column("phrase_error", [""] * n)
    return [(str(p) if p is not None else "", [] if indices[k] is None else [int(i) for i in indices[k]],
             str(status[k]), str(errors[k] or "")) for k, p in enumerate(phrases)]


def make_job(item: dict[str, Any], image: Image.Image | None, status: str, error: str) -> Job:
    """A :class:`Job` for a nouns row; ``status``/``error`` describe its image."""
    job = Job(item, image, status, error)
    for phrase, _, p_status, _ in _phrase_entries(item):
        key = phrase.strip().lower()
        if not key:
            continue
        if key not in job.phrases:
            job.phrases.append(key)
            job.usable.append(False)
        job.usable[job.phrases.index(key)] |= p_status == STATUS_OK
    return job


def _skip_summary(labels: list[str], reasons: list[str]) -> str:
    skipped = [f"{label!r}: {reason}" for label, reason in zip(labels, reasons) if reason in ("empty_label", "unmatched_label")]
    return f"{len(labels)} boxes above box_threshold" + (f"; skipped {', '.join(skipped[:5])}" if skipped else "")


def rows_for_job(job: Job, detections: Detections | None, masks: dict[int, tuple[np.ndarray, list[int]]],
                 resolution: int, summary: str = "") -> list[dict[str, Any]]:
    """The artifacts/masks rows of one caption.

    ``masks[k]`` = (union mask (H, W) bool, indices of its boxes in ``detections``) for unique phrase ``k``.
    """
    item, entries = job.item, _phrase_entries(job.item)
    if job.status != STATUS_OK:
        return [_row(item, p, idx, job.status, job.error) for p, idx, _, _ in entries] or [
            _row(item, "", [], job.status, job.error)]
    if not entries:
        error = item.get("error") or f"caption {item['image_id']}: no noun phrase"
        return [_row(item, "", [], "no_phrases", str(error))]
    rows = []
    for phrase, idx, p_status, p_error in entries:
        key = phrase.strip().lower()
        if not key:
            rows.append(_row(item, phrase, idx, "empty_phrase", f"caption {item['image_id']}: empty phrase"))
        elif p_status != STATUS_OK:
            rows.append(_row(item, phrase, idx, "not_aligned", p_error or p_status))
        elif job.phrases.index(key) not in masks:
            rows.append(_row(item, phrase, idx, "no_detection", f"no box matched {phrase!r} ({summary})"))
        else:
            rows.append(_mask_row(item, phrase, idx, *masks[job.phrases.index(key)], detections, resolution))
    return rows


def _mask_row(item: dict[str, Any], phrase: str, idx: list[int], mask: np.ndarray, boxes: list[int],
              detections: Detections, resolution: int) -> dict[str, Any]:
    """Row with the union ``mask``, its ``train_mask``, enclosing box and best score of boxes ``boxes``."""
    chosen = detections.boxes[boxes]
    box = [float(chosen[:, 0].min()), float(chosen[:, 1].min()), float(chosen[:, 2].max()), float(chosen[:, 3].max())]
    small = train_mask(mask, resolution)
    status, error = STATUS_OK, ""
    if not mask.any():
        status, error = "empty_mask", f"SAM returned no pixel for {phrase!r} ({len(boxes)} boxes)"
    elif not small.any():
        status, error = "outside_crop", f"mask of {phrase!r} lies outside the {resolution}px centre crop"
    return _row(item, phrase, idx, status, error, mask=rle_encode(mask), train_mask=rle_encode(small), box=box,
                score=float(detections.scores[boxes].max()))


def assign_boxes(job: Job, detections: Detections) -> tuple[dict[int, list[int]], list[str]]:
    """Boxes of each usable unique phrase (``{k: [box indices]}``) and each box's match rule/skip reason."""
    assigned: dict[int, list[int]] = {}
    reasons = []
    for b, label in enumerate(detections.labels):
        k, reason = match_label(label, job.phrases)
        reasons.append(reason)
        if k is not None and job.usable[k]:
            assigned.setdefault(k, []).append(b)
    return assigned, reasons


@dataclass(frozen=True)
class Grounder:
    """Everything a shard needs to turn jobs into rows: models, thresholds, batch size, resolution."""

    detector: GroundingDetector
    segmenter: Any
    box_threshold: float
    text_threshold: float
    batch_size: int
    resolution: int

    def run(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Rows of ``jobs`` (in order); inference in batches of ``batch_size`` images; a batch that raises
        is retried one image at a time so only the failing image gets ``inference_failed``."""
        results: dict[int, list[dict[str, Any]]] = {}
        todo = [i for i, job in enumerate(jobs) if job.needs_inference]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            try:
                results.update(zip(batch, self._infer([jobs[i] for i in batch])))
            except Exception as err:  # noqa: BLE001 - recorded per image below, never swallowed silently
                log.warning("batch of %d images failed (%s); retrying one by one", len(batch), err)
                for i in batch:
                    results[i] = self._infer_one(jobs[i])
        rows = []
        for i, job in enumerate(jobs):
            rows.extend(results[i] if i in results else rows_for_job(job, None, {}, self.resolution))
        return rows

    def _infer_one(self, job: Job) -> list[dict[str, Any]]:
        try:
            return self._infer([job])[0]
        except Exception as err:  # noqa: BLE001
            log.error("image %s: inference failed: %s", job.item["image_id"], err)
            failed = Job(job.item, job.image, "inference_failed", f"{type(err).__name__}: {err}", job.phrases, job.usable)
            return rows_for_job(failed, None, {}, self.resolution)

    def _infer(self, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        images = [job.image for job in jobs]
        found = self.detector.detect(images, [build_prompt(j.phrases) for j in jobs], self.box_threshold,
                                     self.text_threshold)
        plans = [assign_boxes(job, det) for job, det in zip(jobs, found)]
        order = [sorted(b for boxes in plan.values() for b in boxes) for plan, _ in plans]
        masks = self.segmenter.segment(images, [det.boxes[o] for det, o in zip(found, order)])
        out = []
        for job, det, (plan, reasons), o, m in zip(jobs, found, plans, order, masks):
            where = {b: n for n, b in enumerate(o)}
            unions = {k: (np.any(m[[where[b] for b in boxes]], axis=0), boxes) for k, boxes in plan.items()}
            out.append(rows_for_job(job, det, unions, self.resolution, _skip_summary(det.labels, reasons)))
        return out


# --- inputs ----------------------------------------------------------------------------------------

NOUNS_COLUMNS = ["image_id", "caption", "phrases", "token_indices", "phrase_status", "phrase_error", "status", "error"]


def read_nouns(nouns_dir: Path) -> list[dict[str, Any]]:
    """All ``artifacts/nouns`` rows (shard order) as dicts."""
    return list(shards.iter_rows(Path(nouns_dir), columns=NOUNS_COLUMNS))


class ImageStore:
    """Random access to ``artifacts/data/images`` rows by ``image_id`` (reads only the shards it needs)."""

    def __init__(self, images_dir: Path):
        self.files: dict[str, Path] = {}
        for path in shards.shard_files(Path(images_dir)):
            for image_id in shards.read_table(path, columns=["image_id"]).column("image_id").to_pylist():
                if str(image_id) in self.files:
                    log.warning("%s: duplicate image_id %s; using the first", images_dir, image_id)
                    continue
                self.files[str(image_id)] = path

    def load(self, image_ids: Iterable[str]) -> dict[str, tuple[Image.Image | None, str, str]]:
        """``{image_id: (RGB image or None, status, error)}`` with status ok / missing_image / corrupt_image."""
        ids = [str(i) for i in dict.fromkeys(image_ids)]
        out = {i: (None, "missing_image", f"image {i}: not in artifacts/data/images; rerun train_data")
               for i in ids if i not in self.files}
        by_file: dict[Path, list[str]] = {}
        for i in ids:
            if i in self.files:
                by_file.setdefault(self.files[i], []).append(i)
        for path, wanted in by_file.items():
            table = shards.read_table(path, columns=["image_id", "image", "status", "error"],
                                      filters=[("image_id", "in", wanted)])
            for row in table.to_pylist():
                out.setdefault(str(row["image_id"]), _decode_image_row(row))
        return out


def _decode_image_row(row: dict[str, Any]) -> tuple[Image.Image | None, str, str]:
    image_id = row["image_id"]
    if row.get("status", STATUS_OK) != STATUS_OK or not row.get("image"):
        return None, "missing_image", f"image {image_id}: images row has status {row.get('status')!r} ({row.get('error')})"
    try:
        return image_from_bytes(row["image"]), STATUS_OK, ""
    except Exception as err:  # noqa: BLE001 - PIL raises several types for bad bytes
        return None, "corrupt_image", f"image {image_id}: bytes do not decode ({type(err).__name__}: {err})"


def model_digest(ref: str, models_dir: str | Path) -> str:
    """Identity of a model reference's weights: file digest for local/embedded models, the id for hub ones."""
    if ref.endswith(".pth") or parse_ref(ref).kind != "hub":
        target = Path(ref) if ref.endswith(".pth") else Path(resolve(ref, models_dir))
        return files_digest(dir_files(target))
    return ref


# --- stage drivers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunContext:
    """Where a stage run reads and writes, and how it is split: paths, rank, device."""

    out_dir: Path
    nouns_dir: Path
    images_dir: Path
    models_dir: Path
    resolution: int
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] | None = None


def write_grounded_masks(ctx: RunContext, cfg: GroundingCfg, scale: MasksScale) -> list[Path]:
    """Run Grounded-SAM over every nouns row into ``ctx.out_dir`` (resumable; this rank's shards)."""
    items = read_nouns(ctx.nouns_dir)
    dtype = inference_dtype(scale.dtype, ctx.device)
    fingerprint = {
        "source": "grounded_sam", "box_threshold": cfg.box_threshold, "text_threshold": cfg.text_threshold,
        "detector": scale.detector, "segmenter": scale.segmenter, "batch_size": scale.batch_size,
        "resolution": ctx.resolution, "device": ctx.device.type, "dtype": str(dtype),
        "cpu_threads": scale.cpu_threads if ctx.device.type == "cpu" else None,  # float sums depend on it
        "detector_files": model_digest(scale.detector, ctx.models_dir),
        "segmenter_files": model_digest(scale.segmenter, ctx.models_dir),
        "inputs": files_digest(shards.shard_files(ctx.nouns_dir) + shards.shard_files(ctx.images_dir)),
    }
    code = code_digest(__name__)
    redo = ("inference_failed",)
    @functools.cache
    def grounder() -> Grounder:
        """Grounding DINO and SAM, loaded on the first call."""
        return Grounder(GroundingDetector.load(scale.detector, ctx.models_dir, ctx.device, dtype),
                        load_segmenter(scale.segmenter, ctx.models_dir, ctx.device, dtype),
                        cfg.box_threshold, cfg.text_threshold, scale.batch_size, ctx.resolution)

    # Models load before stale shards are dropped: a reference that does not load loses no finished work.
    # They are not loaded at all when every shard of this rank is written (a rerun for the summary only).
    if shards.pending_shards(ctx.out_dir, items, scale.shard_size, fingerprint, code=code, rank=ctx.rank,
                             world_size=ctx.world_size, redo_statuses=redo):
        grounder()
    else:
        log.info("%s: every shard of this process is written; Grounding DINO and SAM are not loaded", ctx.out_dir)
    shards.prepare_for_ranks(ctx.out_dir, len(items), scale.shard_size, fingerprint, ctx.rank, ctx.barrier, code)
    store = ImageStore(ctx.images_dir)

    def process(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        images = store.load(str(item["image_id"]) for item in chunk)
        return grounder().run([make_job(item, *images[str(item["image_id"])]) for item in chunk])

    return write_shards(ctx.out_dir, items, process, scale.shard_size, fingerprint, ctx.rank, ctx.world_size,
                        code=code, desc="masks", redo_statuses=redo)


# --- the authors' released masks -------------------------------------------------------------------

def authors_mask_path(path: str, masks_dir: Path) -> Path:
    """Where a metadata mask path (``seg/<id>/mask_<id>_<word>.png``) lies in the mask folder
    (``<masks_dir>/<id>/mask_<id>_<word>.png``). Only a leading ``seg/`` is dropped (the original replaced
    every "seg" substring, SPEC §1.1 step 3)."""
    parts = Path(path).parts
    if parts and parts[0] == "seg":
        parts = parts[1:]
    return Path(masks_dir, *parts)


def read_authors_mask(path: Path) -> tuple[np.ndarray | None, str, str]:
    """A released mask PNG -> ((H, W) bool from channel 0 > 0, status, error) (SPEC §2.7: RGBA from
    ``plt.imsave``, white = object). All black -> ``blank_mask``: the file cannot tell an empty mask from one
    covering the whole image (SPEC §1.6 item 7), so it gives no supervision."""
    if not path.is_file():
        return None, "missing_mask_file", f"{path}: mask file not found; check masks.authors_masks"
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im)
    except Exception as err:  # noqa: BLE001 - PIL raises several types for bad files
        return None, "corrupt_mask", f"{path}: does not decode ({type(err).__name__}: {err})"
    mask = (pixels[..., 0] if pixels.ndim == 3 else pixels) > 0
    if not mask.any():
        return None, "blank_mask", f"{path}: all black (empty, or whole-image mask written black by plt.imsave)"
    return mask, STATUS_OK, ""


def _nouns_lookup(nouns: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[list[int], str, str]]]:
    """``{image_id: {phrase: (token_indices, phrase_status, phrase_error)}}`` (first occurrence wins)."""
    table: dict[str, dict[str, tuple[list[int], str, str]]] = {}
    for item in nouns:
        entries = table.setdefault(str(item["image_id"]), {})
        for phrase, idx, status, error in _phrase_entries(item):
            entries.setdefault(phrase, (idx, status, error))
    return table


def authors_rows(entry: dict[str, Any], nouns: dict[str, tuple[list[int], str, str]] | None, masks_dir: Path,
                 resolution: int) -> list[dict[str, Any]]:
    """Rows of one metadata line: one per ``[word, path]`` of its ``attn_list`` (token indices from nouns)."""
    if "bad_line" in entry:
        return [_row({"image_id": f"line{entry['bad_line']}"}, "", [], "bad_metadata", entry["error"])]
    item = {"image_id": Path(entry["file_name"]).stem, "caption": entry.get("text")}
    if not entry["attn_list"]:
        return [_row(item, "", [], "no_phrases", f"caption {item['image_id']}: empty attn_list")]
    rows = []
    for word, path in entry["attn_list"]:
        idx, status, error = (nouns or {}).get(word, ([], "missing", f"{word!r} not in artifacts/nouns for {item['image_id']}"))
        if path is None:
            rows.append(_row(item, word, idx, "no_detection", "the authors' metadata has no mask for this phrase"))
        elif status != STATUS_OK:
            rows.append(_row(item, word, idx, "not_aligned", error or status))
        else:
            mask, m_status, m_error = read_authors_mask(authors_mask_path(path, masks_dir))
            if mask is None:
                rows.append(_row(item, word, idx, m_status, m_error))
                continue
            small = train_mask(mask, resolution)
            rows.append(_row(item, word, idx, STATUS_OK if small.any() else "outside_crop",
                             "" if small.any() else f"mask lies outside the {resolution}px centre crop",
                             mask=rle_encode(mask), train_mask=rle_encode(small)))
    return rows


def write_authors_masks(ctx: RunContext, scale: MasksScale) -> list[Path]:
    """Convert the authors' metadata + mask PNGs into ``ctx.out_dir`` shards (resumable)."""
    for key in ("authors_metadata", "authors_masks"):
        if not str(getattr(scale, key)).strip():
            raise MissingInputError(f"profiles.<p>.masks.{key} is empty: masks.source: authors needs the path of "
                                    f"the authors' {'metadata.jsonl' if key == 'authors_metadata' else 'mask folder'}")
    masks_dir = Path(scale.authors_masks)
    if not masks_dir.is_dir():
        raise MissingInputError(f"{masks_dir}: authors' mask folder not found; unpack coco_gsam_seg.tar there "
                                f"or set profiles.<p>.masks.authors_masks")
    try:
        text = read_source(scale.authors_metadata).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MissingInputError(f"authors' metadata: {err}; set profiles.<p>.masks.authors_metadata") from err
    entries = read_records(text, scale.authors_metadata, keep_bad=True)
    lookup = _nouns_lookup(read_nouns(ctx.nouns_dir))
    masks = files_digest(dir_files(masks_dir), relative_to=masks_dir, full_hash_limit=-1)  # size and mtime
    fingerprint = {"source": "authors", "metadata": fingerprint_of(text), "masks": masks,
                   "nouns": files_digest(shards.shard_files(ctx.nouns_dir)), "resolution": ctx.resolution}
    code = code_digest(__name__)
    shards.prepare_for_ranks(ctx.out_dir, len(entries), scale.shard_size, fingerprint, ctx.rank, ctx.barrier, code)

    def process(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [row for e in chunk for row in
                authors_rows(e, lookup.get(Path(e.get("file_name", "")).stem), masks_dir, ctx.resolution)]

    return write_shards(ctx.out_dir, entries, process, scale.shard_size, fingerprint, ctx.rank, ctx.world_size,
                        code=code, desc="authors masks")


# --- metrics and figure ----------------------------------------------------------------------------

def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Flat counts of artifacts/masks rows: images, phrases, masks, areas, rows by status."""
    from pycocotools import mask as mask_utils

    counts: dict[str, Any] = {f"status_{s}": 0 for s in MASK_STATUSES}
    images = {str(r["image_id"]) for r in rows}
    bad_images = {str(r["image_id"]) for r in rows if r["status"] in INPUT_ERRORS}
    ok = [r for r in rows if r["status"] == STATUS_OK]
    for r in rows:
        counts[f"status_{r['status']}"] = counts.get(f"status_{r['status']}", 0) + 1

    def area(rle: dict[str, Any]) -> float:
        h, w = rle["size"]
        return float(mask_utils.area({"size": list(rle["size"]), "counts": rle["counts"].encode()})) / (h * w)

    counts.update(
        rows=len(rows), images=len(images), images_with_mask=len({str(r["image_id"]) for r in ok}),
        phrases=sum(1 for r in rows if r["phrase"]), phrases_with_mask=len(ok),
        masks_per_image=len(ok) / max(1, len(images - bad_images)),
        mean_mask_area=float(np.mean([area(r["mask"]) for r in ok])) if ok else 0.0,
        mean_train_mask_area=float(np.mean([area(r["train_mask"]) for r in ok])) if ok else 0.0,
        input_errors=sum(1 for r in rows if r["status"] in INPUT_ERRORS),
    )
    counts["input_error_rate"] = counts["input_errors"] / len(rows) if rows else 0.0
    return counts


def check_input_errors(metrics: dict[str, Any], max_rate: float) -> None:
    """Raise when no row was written or the share of rows with bad input passes ``max_rate``."""
    if metrics["rows"] == 0:
        raise MissingInputError("masks: no rows; run the nouns and train_data stages first")
    if metrics["input_error_rate"] > max_rate:
        raise FailureRateError(
            f"masks: {metrics['input_errors']} of {metrics['rows']} rows have a missing/corrupt image, bad "
            f"metadata or a missing/corrupt authors' mask file ({metrics['input_error_rate']:.1%} > "
            f"grounding.max_input_error_rate={max_rate:.1%}); "
            f"see status/error in artifacts/masks/")


def plot_overlay(rows: Sequence[dict[str, Any]], images: dict[str, Image.Image], out_path: Path,
                 num_images: int) -> int:
    """Draw up to ``num_images`` images with their ok masks (tinted) and boxes (labelled); returns the count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = [i for i in dict.fromkeys(str(r["image_id"]) for r in rows if r["status"] == STATUS_OK) if i in images]
    ids = ids[:num_images]
    fig, axes = plt.subplots(1, max(1, len(ids)), figsize=(3.2 * max(1, len(ids)), 3.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, image_id in zip(axes[0], ids):
        picture = np.asarray(images[image_id], dtype=np.float32) / 255.0
        mine = [r for r in rows if str(r["image_id"]) == image_id and r["status"] == STATUS_OK]
        for k, r in enumerate(mine):
            colour = np.array(colours(k % 10)[:3], dtype=np.float32)
            m = rle_decode(r["mask"])
            picture[m] = 0.55 * picture[m] + 0.45 * colour
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = r["box"] if r["box"] is not None else (xs.min(), ys.min(), xs.max(), ys.max())
            if r["box"] is not None:
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, color=colour))
            ax.text(x0, y0, r["phrase"], fontsize=7, color="white", backgroundcolor=tuple(colour), va="bottom")
        ax.imshow(np.clip(picture, 0, 1))
        ax.set_title(image_id, fontsize=8)
        ax.axis("off")
    if not ids:
        axes[0][0].text(0.5, 0.5, "no masks", ha="center")
        axes[0][0].axis("off")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return len(ids)


