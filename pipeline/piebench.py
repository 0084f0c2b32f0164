"""PIE-Bench metrics (SPEC §5.4-5.6), computed as PnPInversion's evaluation script does.

Per image (source and edit as (H, W, 3) uint8 at the same size, PIE-Bench mask (H, W) with 1 = edited
region, forced border included):

* ``structure_distance``: DINO ViT-B/8 keys of the last block (the key projection's output, heads
  concatenated, CLS token included) → cosine self-similarity (T × T) → MSE between source and edit.
  The benchmark feeds **0-255** pixel values through ImageNet normalisation; that quirk is the default
  (``piebench.structure_input_range: "0-255"``; ``"0-1"`` gives the intended input).
* background metrics ``*_unedit_part``: both images in [0, 1] multiplied by (1 − mask) and scored on the
  **full frame** (zeros included): PSNR (data range 1), LPIPS (SqueezeNet, inputs in [−1, 1]), MSE, SSIM
  (Gaussian window 11, σ 1.5, k1 0.01, k2 0.03, data range 1, as torchmetrics' default).
* CLIP similarity ``max(100 · cos(image, text), 0)``: edit vs editing prompt (whole), edit × mask vs
  editing prompt (edited part), source vs original prompt. Prompts have their ``[ ]`` removed.

NaN rules (SPEC §5.4): background metrics are NaN when the mask covers the whole image; the edited-part
CLIP score is NaN when the mask is empty. Means skip NaN and count it. Table scale factors (SPEC §5.6):
structure ×10³, LPIPS ×10³, MSE ×10⁴, SSIM ×10², PSNR and CLIP as they are.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.clip_ref import check_clip_ref
from pipeline.clip_score import ClipSimilarity
from pipeline.config import Bounds, NonNegativeInt
from pipeline.datasets.piebench_files import PieBenchEntry, load_example, strip_brackets
from pipeline.models import ModelLoadError, from_pretrained
from pipeline.names import PIEBENCH_KEYS as TABLE
from pipeline.seeding import derive_seed
from pipeline.store.codecs import image_from_bytes
from pipeline.store.shards import STATUS_OK

log = logging.getLogger(__name__)

METRICS = (
    "structure_distance", "psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part",
    "clip_similarity_source_image", "clip_similarity_target_image", "clip_similarity_target_image_edit_part",
)
BACKGROUND_METRICS = ("psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SSIM_ARGS = dict(gaussian_weights=True, sigma=1.5, win_size=11, K1=0.01, K2=0.03, data_range=1.0,
                 use_sample_covariance=False, channel_axis=-1)


@dataclass(frozen=True)
class PieBenchCfg:
    """Params section ``piebench`` (evaluation conventions, identical in every profile)."""

    jpeg_roundtrip: bool = True  # edits saved as JPEG before scoring, as the benchmark's editors did
    jpeg_quality: Annotated[int, Bounds(low=1, high=100)] = 75  # PIL's default quality
    structure_input_range: Literal["0-255", "0-1"] = "0-255"  # "0-255": the benchmark's quirk


@dataclass(frozen=True)
class PieBenchScale:
    """Params section ``profiles.<p>.piebench``: metric models and the figure size."""

    dino_model: str  # facebook/dino-vitb8 | embedded:tiny-dino | local ViTModel folder
    clip_model: str  # ARCH:TAG (ViT-L-14:openai) | hf-hub:ORG/REPO | embedded:NAME | local open_clip folder
    lpips_backbone: Literal["pretrained", "random"]  # random: seeded SqueezeNet, works offline
    panels: NonNegativeInt = 4  # images shown in plots/edits_<backbone>.png

    def __post_init__(self) -> None:
        check_clip_ref(self.clip_model)


# --- pixel metrics ---------------------------------------------------------------------------------

def to_unit(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → float32 in [0, 1]."""
    return np.asarray(image, dtype=np.float32) / 255.0


def background_pair(source: np.ndarray, edit: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Both images in [0, 1] with the edited region (mask == 1) zeroed, (H, W, 3) float32; None when the
    mask covers every pixel (no background: the metrics are NaN)."""
    keep = 1.0 - (np.asarray(mask) > 0).astype(np.float32)
    if keep.sum() == 0:
        return None
    return to_unit(source) * keep[..., None], to_unit(edit) * keep[..., None]


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over all elements (float64 accumulation)."""
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """10 · log10(range² / MSE) over all elements; +inf for identical inputs."""
    err = mse(a, b)
    return math.inf if err == 0 else 10.0 * math.log10(data_range**2 / err)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of (H, W, 3) images in [0, 1] with torchmetrics' default Gaussian-window settings.

    The mean leaves out the 5-pixel border, as torchmetrics did before its PR #2721 (docs/editing.md)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(np.asarray(a, np.float64), np.asarray(b, np.float64), **SSIM_ARGS))


def jpeg_roundtrip(image: np.ndarray, quality: int = 75) -> np.ndarray:
    """Encode (H, W, 3) uint8 as JPEG at ``quality`` and decode it again."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(image_from_bytes(buf.getvalue()))


def prepare_edit(edit: np.ndarray, size: tuple[int, int], cfg: PieBenchCfg) -> np.ndarray:
    """The edit as the benchmark scores it: resized (bicubic) to the source's (H, W) if needed, then the
    JPEG round trip when ``cfg.jpeg_roundtrip``."""
    if edit.shape[:2] != tuple(size):
        edit = np.asarray(Image.fromarray(edit).resize((size[1], size[0]), Image.BICUBIC))
    return jpeg_roundtrip(edit, cfg.jpeg_quality) if cfg.jpeg_roundtrip else edit


# --- model-based metrics ---------------------------------------------------------------------------

class StructureDistance:
    """DINO key self-similarity distance. ``model``: a transformers ``ViTModel`` (DINO ViT-B/8)."""

    def __init__(self, model, input_range: str = "0-255", device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.scale = 1.0 if input_range == "0-255" else 1.0 / 255.0

    @classmethod
    def load(cls, ref: str, models_dir: str | Path, input_range: str, device: str | torch.device = "cpu"):
        """Load ``ref`` (``facebook/dino-vitb8``, ``embedded:tiny-dino``, a local folder) as a ``ViTModel``."""
        from transformers import ViTModel

        return cls(from_pretrained(ViTModel, ref, models_dir, add_pooling_layer=False), input_range, device)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 → (B, 3, h, w): ×1 or /255, ``Resize(224, max_size=480)``, ImageNet norm."""
        from torchvision.transforms.v2 import functional as F

        x = torch.from_numpy(np.asarray(images, np.float32) * self.scale).permute(0, 3, 1, 2)
        x = F.resize(x, [224], max_size=480, antialias=True)
        return F.normalize(x, IMAGENET_MEAN, IMAGENET_STD).to(self.device)

    @torch.no_grad()
    def keys(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 → keys of the last block, (B, T, D) with T = 1 + patches (CLS first).

        transformers 5 splits ViT's fused qkv projection; the key projection is
        ``layers[-1].attention.k_proj`` (its output = DINO's qkv keys, heads concatenated).
        """
        captured: list[torch.Tensor] = []
        hook = self.model.layers[-1].attention.k_proj.register_forward_hook(
            lambda _m, _i, out: captured.append(out.detach()))
        try:
            self.model(pixel_values=self.preprocess(images), interpolate_pos_encoding=True)
        finally:
            hook.remove()
        return captured[0].float()

    @staticmethod
    def self_similarity(keys: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → (B, T, T) cosine similarity, dividing by the norms' outer product clamped at 1e-8."""
        norms = keys.norm(dim=-1, keepdim=True)
        return keys @ keys.transpose(1, 2) / (norms @ norms.transpose(1, 2)).clamp(min=1e-8)

    def __call__(self, source: np.ndarray, edit: np.ndarray) -> float:
        """MSE between the self-similarity matrices of ``source`` and ``edit`` ((H, W, 3) uint8 each)."""
        sims = self.self_similarity(self.keys(np.stack([source, edit])))
        return float(torch.mean((sims[0] - sims[1]) ** 2))


class Lpips:
    """SqueezeNet LPIPS (the ``lpips`` package, v0.1 linear heads) on inputs in [0, 1], scored in [−1, 1]."""

    def __init__(self, backbone: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu"):
        import warnings

        import lpips

        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
                torch.manual_seed(derive_seed(seed, "lpips", "squeeze"))
                net = lpips.LPIPS(net="squeeze", version="0.1", pnet_rand=backbone == "random", verbose=False)
        except (OSError, RuntimeError) as err:
            raise ModelLoadError(
                f"LPIPS: torchvision's SqueezeNet 1.1 weights could not be loaded ({err}); put "
                f"squeezenet1_1-b8a52dc0.pth in $TORCH_HOME/hub/checkpoints, or set "
                f"profiles.<p>.piebench.lpips_backbone: random") from err
        self.net = net.eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        """LPIPS of two (H, W, 3) float images in [0, 1] (mean over the spatial map)."""
        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(x, np.float32) * 2 - 1).permute(2, 0, 1)[None].to(self.device)

        return float(self.net(tensor(a), tensor(b)).flatten()[0])


class PieBenchScorer:
    """All PIE-Bench metrics of one (source, edit, mask, prompts) example; see the module docstring."""

    def __init__(self, structure: StructureDistance, lpips_net: Lpips, clip: ClipSimilarity):
        self.structure, self.lpips, self.clip = structure, lpips_net, clip

    @classmethod
    def load(cls, scale: PieBenchScale, cfg: PieBenchCfg, models_dir: str | Path, seed: int,
             device: str | torch.device = "cpu") -> "PieBenchScorer":
        """Load the DINO, LPIPS and CLIP models named in ``scale``."""
        structure = StructureDistance.load(scale.dino_model, models_dir, cfg.structure_input_range, device)
        clip = ClipSimilarity.load(scale.clip_model, models_dir, device)
        return cls(structure, Lpips(scale.lpips_backbone, seed, device), clip)

    def score(self, source: np.ndarray, edit: np.ndarray, mask: np.ndarray,
              original_prompt: str, editing_prompt: str) -> dict[str, float]:
        """Raw (unscaled) metrics of one example; prompts already without brackets.

        ``source``, ``edit``: (H, W, 3) uint8 of equal size; ``mask``: (H, W), nonzero = edited region.
        """
        if source.shape != edit.shape or source.shape[:2] != np.asarray(mask).shape:
            raise ValueError(f"shapes differ: source {source.shape}, edit {edit.shape}, mask {np.shape(mask)}")
        binary = (np.asarray(mask) > 0).astype(np.uint8)
        out = {"structure_distance": self.structure(source, edit)}
        pair = background_pair(source, edit, binary)
        if pair is None:
            out.update({m: math.nan for m in BACKGROUND_METRICS})
        else:
            a, b = pair
            out.update(psnr_unedit_part=psnr(a, b), lpips_unedit_part=self.lpips(a, b),
                       mse_unedit_part=mse(a, b), ssim_unedit_part=ssim(a, b))
        out["clip_similarity_source_image"] = self.clip(source, original_prompt)
        out["clip_similarity_target_image"] = self.clip(edit, editing_prompt)
        out["clip_similarity_target_image_edit_part"] = (
            self.clip((edit * binary[..., None]).astype(np.uint8), editing_prompt) if binary.any() else math.nan)
        return out


# --- a benchmark run ------------------------------------------------------------------------------

def score_edits(
    scorer: PieBenchScorer,
    root: str | Path,
    entries: dict[str, PieBenchEntry],
    edits: dict[str, dict[str, Any]],
    cfg: PieBenchCfg,
    panels: int = 0,
) -> tuple[pd.DataFrame, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]]:
    """Score every entry's edit → (one row per entry, figure panels of the first ``panels`` scored ones).

    ``edits`` maps image id → edit row (``image`` PNG bytes, ``status``, ``error``). Row columns:
    ``image_id``, ``editing_type_id``, ``status`` ("ok", the edit's own failure status, "missing_edit",
    "bad_input"), ``error`` and the raw metrics of :data:`METRICS` (NaN when not scored).
    """
    rows, shown = [], []
    for image_id, entry in tqdm(entries.items(), desc="piebench", unit="image"):
        row: dict[str, Any] = {"image_id": image_id, "editing_type_id": entry.editing_type_id,
                               "status": STATUS_OK, "error": "", **{m: math.nan for m in METRICS}}
        edit_row = edits.get(image_id)
        if edit_row is None:
            row.update(status="missing_edit", error="no row in the edit shards; rerun the edit stage")
        elif edit_row["status"] != STATUS_OK:
            row.update(status=edit_row["status"], error=edit_row["error"])
        else:
            try:
                source, mask = load_example(root, entry)
                edit = prepare_edit(np.asarray(image_from_bytes(edit_row["image"])), source.shape[:2], cfg)
                row.update(scorer.score(source, edit, mask, strip_brackets(entry.original_prompt),
                                        strip_brackets(entry.editing_prompt)))
                if len(shown) < panels:
                    shown.append((f"{image_id}: {strip_brackets(entry.editing_prompt)[:40]}", source, mask, edit))
            except (OSError, ValueError) as err:
                log.warning("%s: not scored (%s)", image_id, err)
                row.update(status="bad_input", error=str(err))
        rows.append(row)
    return pd.DataFrame(rows), shown


# --- aggregation -----------------------------------------------------------------------------------

def summarize(scores: pd.DataFrame) -> dict[str, Any]:
    """Flat table-scaled means of ``scores`` (rows with ``status == "ok"``), overall and per editing type.

    Keys: ``<table name>`` and ``type_<id>.<table name>`` (means over finite values), ``<metric>.n``
    (values averaged) and ``<metric>.nan`` (NaN or infinite values skipped), ``images``, ``scored``,
    ``type_<id>.scored``.
    """
    ok = scores[scores["status"] == "ok"] if len(scores) else scores
    out: dict[str, Any] = {"images": int(len(scores)), "scored": int(len(ok))}
    for metric, (name, factor) in TABLE.items():
        values = ok[metric].astype(float).to_numpy() if len(ok) else np.zeros(0)
        finite = values[np.isfinite(values)]
        out[name] = float(finite.mean() * factor) if finite.size else math.nan
        out[f"{name}.n"] = int(finite.size)
        out[f"{name}.nan"] = int(values.size - finite.size)
    for type_id, group in (ok.groupby("editing_type_id") if len(ok) else []):
        out[f"type_{type_id}.scored"] = int(len(group))
        for metric, (name, factor) in TABLE.items():
            values = group[metric].astype(float).to_numpy()
            finite = values[np.isfinite(values)]
            out[f"type_{type_id}.{name}"] = float(finite.mean() * factor) if finite.size else math.nan
    return out


def edits_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str | Path) -> None:
    """PNG grid, one row per (title, source (H, W, 3), mask (H, W), edit (H, W, 3)): source | mask | edit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(panels), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, (title, source, mask, edit) in enumerate(panels):
        for col, (img, label) in enumerate(((source, "source"), (mask, "mask"), (edit, "edit"))):
            gray = dict(cmap="gray", vmin=0, vmax=1) if img.ndim == 2 else {}
            axes[row, col].imshow(img, **gray)
            axes[row, col].set_title(f"{label}\n{title}" if col == 2 else label, fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
