"""Grounding DINO and SAM: loading a model reference and running it batched over images.

* :class:`GroundingDetector` (transformers' ``GroundingDinoForObjectDetection``): a box is kept when its best
  token scores above ``box_threshold``; its label is the text of the tokens above ``text_threshold``, decoded
  by transformers' ``post_process_grounded_object_detection``; boxes in absolute xyxy pixels of the original
  image. No NMS. Batched over images (padded to the batch's largest image, as the processor does).
* :class:`HFSamSegmenter` for ``SamModel``/``SamHQModel``, :class:`SegmentAnythingSegmenter` for Meta's
  ``.pth`` checkpoints (:func:`load_segmenter` picks): one mask per box (``multimask_output=False``) at the
  original image size, image encoder batched over images.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError, MissingInputError
from pipeline.masks.jobs import Detections
from pipeline.models import from_pretrained

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


def load_segmenter(ref: str, models_dir: str | Path, device: torch.device,
                   dtype: torch.dtype) -> HFSamSegmenter | SegmentAnythingSegmenter:
    """A segmenter for ``ref`` in ``dtype``: a ``.pth`` file -> :class:`SegmentAnythingSegmenter`, else
    transformers SAM."""
    if ref.endswith(".pth"):
        return SegmentAnythingSegmenter.load(ref, device, dtype)
    return HFSamSegmenter.load(ref, models_dir, device, dtype)
