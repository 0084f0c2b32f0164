"""Image feature extractors for FID: uint8 images (N, H, W, 3) in, float64 features (N, D) out.

Two implementations of one interface (:class:`FeatureExtractor`):

* :class:`InceptionFeatureExtractor`: the standard FID network, torch-fidelity's ``FeatureExtractorInceptionV3``
  (the TensorFlow ``inception-2015-12-05`` graph converted to PyTorch, as in TTUR, pytorch-fid and
  clean-fid), pool3 features, D = 2048. It resizes to 299×299 itself with torch-fidelity's bilinear
  resize that reproduces TensorFlow 1.x's ``resize_bilinear`` (no antialiasing), then maps [0, 255] to
  [-1, 1]. The weights come from a local file (``weights-inception-2015-12-05-6726825d.pth``); nothing is
  downloaded here (docs/fid.md says where to get it).
* :class:`TinyFeatureExtractor`: the offline demo's stand-in, a seeded random 3-layer CNN with global
  average pooling, D = 64, at a fixed 64×64 input (torch bilinear, ``antialias=True``,
  ``align_corners=False``). :func:`build_tiny_extractor` writes it (safetensors + JSON config),
  :meth:`TinyFeatureExtractor.load` reads it back. Its FIDs mean nothing; its code path is the real one.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import MissingInputError, StageError
from pipeline.photorealism.fid import FeatureStats
from pipeline.seeding import torch_generator

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch.hub naming: the 8 hex digits before the suffix are the start of the file's SHA-256.
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_DIM = 2048

TINY_WEIGHTS_FILE = "fid_tiny.safetensors"
TINY_CONFIG_FILE = "fid_tiny.json"
TINY_CONFIG = dict(architecture="tiny-conv-fid", channels=[16, 32, 64], kernel_size=3, stride=2, input_size=64)


class WeightsError(StageError, ValueError):
    """A weights file exists but is not the expected one (wrong hash, unsafe or mismatched contents)."""


def check_images(images: np.ndarray) -> np.ndarray:
    """``images`` as a C-contiguous uint8 (N, H, W, 3) array, or ``ValueError`` saying what is wrong."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images: expected dtype uint8 in [0, 255], got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected shape (N, H, W, 3), got {images.shape}")
    return np.ascontiguousarray(images)


class FeatureExtractor(ABC):
    """Maps uint8 RGB images (N, H, W, 3) to float64 features (N, ``dim``), ``batch_size`` images at a time.

    Subclasses set ``name`` and ``dim`` and implement :meth:`_forward` on a uint8 (B, 3, H, W) tensor.
    """

    name: str = "feature-extractor"
    dim: int = 0

    def __init__(self, batch_size: int = 32, device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = torch.device(device)

    @abstractmethod
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, dim) features of a uint8 (B, 3, H, W) batch on ``self.device``."""

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(N, dim) float64 features of uint8 ``images`` (N, H, W, 3); all images of one call share H and W."""
        images = check_images(images)
        out = np.empty((images.shape[0], self.dim), dtype=np.float64)
        for start in range(0, images.shape[0], self.batch_size):
            chunk = torch.from_numpy(images[start:start + self.batch_size]).permute(0, 3, 1, 2).contiguous()
            feats = self._forward(chunk.to(self.device))
            out[start:start + chunk.shape[0]] = feats.detach().to("cpu", torch.float64).numpy()
        return out

    def stats(self, image_batches: Iterable[np.ndarray], stats: FeatureStats | None = None) -> FeatureStats:
        """Stream the features of uint8 (N, H, W, 3) batches (sizes may differ) into ``stats`` (new if None)."""
        stats = FeatureStats(self.dim) if stats is None else stats
        for images in image_batches:
            stats.update(self(images))
        return stats


# ---------------------------------------------------------------------------------------------- Inception-v3


def default_inception_weights_path() -> Path:
    """Where torch-fidelity caches its Inception weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _missing_weights_message(path: Path) -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return (f"{path}: Inception-v3 FID weights not found. Expected torch-fidelity's {INCEPTION_WEIGHTS_FILE} "
            f"(SHA-256 starting {INCEPTION_SHA256_PREFIX}); its default location is "
            f"{default_inception_weights_path()}. This machine cannot download it: on a machine with network, "
            f"fetch {URL_INCEPTION_V3} (or run torch-fidelity once, which caches it there) and copy the file "
            f"to this path; see docs/fid.md")


def sha256_of_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file at ``path``, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatureExtractor(FeatureExtractor):
    """torch-fidelity's Inception-v3 (``inception-v3-compat``) pool3 features, D = 2048, from a local file.

    Args:
        weights_path: the ``.pth`` state dict (default :func:`default_inception_weights_path`). A missing
            file raises :class:`~pipeline.config.MissingInputError` naming it and how to get it.
        verify_hash: check that the file's SHA-256 starts with ``6726825d`` (torch.hub's name convention
            for the released file); off only for tests with random weights.
        batch_size, device: as :class:`FeatureExtractor`.

    The state dict is first read with ``torch.load(weights_only=True)``, so a file that holds anything but
    tensors is refused before torch-fidelity loads it (torch-fidelity itself calls ``weights_only=False``).
    """

    name = "inception-v3-compat"
    dim = INCEPTION_DIM

    def __init__(self, weights_path: str | Path | None = None, verify_hash: bool = True, batch_size: int = 32,
                 device: str | torch.device = "cpu"):
        super().__init__(batch_size, device)
        path = Path(weights_path) if weights_path is not None else default_inception_weights_path()
        if not path.is_file():
            raise MissingInputError(_missing_weights_message(path))
        digest = sha256_of_file(path)
        if verify_hash:
            if not digest.startswith(INCEPTION_SHA256_PREFIX):
                raise WeightsError(f"{path}: SHA-256 {digest} does not start with {INCEPTION_SHA256_PREFIX}; "
                                   f"this is not torch-fidelity's {INCEPTION_WEIGHTS_FILE} (see docs/fid.md)")
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # whatever the failure, the file is not a plain tensor state dict
            raise WeightsError(f"{path}: not a plain tensor state dict ({err})") from err
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            net = FeatureExtractorInceptionV3(self.name, ["2048"], feature_extractor_weights_path=str(path))
        except RuntimeError as err:  # load_state_dict: missing / unexpected keys or shapes
            raise WeightsError(f"{path}: does not fit torch-fidelity's Inception-v3 ({err})") from err
        self.net = net.to(self.device).eval()
        self.weights_path, self.weights_sha256 = path, digest

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        (features,) = self.net(batch)  # resizes to 299 (TF1-compatible bilinear) and scales to [-1, 1] itself
        return features


# ---------------------------------------------------------------------------------------------- tiny demo CNN


class TinyConvNet(torch.nn.Module):
    """Conv(k, stride s) → ReLU → … → Conv → global average pool: (B, 3, S, S) in [-1, 1] → (B, channels[-1])."""

    def __init__(self, channels: list[int], kernel_size: int, stride: int):
        super().__init__()
        layers: list[torch.nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(channels):
            layers.append(torch.nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2))
            if i < len(channels) - 1:
                layers.append(torch.nn.ReLU())
            c_in = c_out
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean(dim=(2, 3))


def _tiny_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """He-normal conv weights and zero biases drawn from ``torch_generator(seed, "fid-tiny")`` (no global RNG)."""
    net = TinyConvNet(config["channels"], config["kernel_size"], config["stride"])
    gen = torch_generator(seed, "fid-tiny")
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("weight"):
            fan_in = value.shape[1] * value.shape[2] * value.shape[3]
            state[key] = torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / fan_in)
        else:
            state[key] = torch.zeros_like(value)
    return state


def build_tiny_extractor(out_dir: str | Path, seed: int) -> None:
    """Write the demo extractor to ``out_dir``: ``fid_tiny.safetensors`` (weights) + ``fid_tiny.json`` (config).

    Same ``seed`` → byte-identical weights (seeded draws, no global RNG); the signature is the model zoo's.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CONFIG, seed=int(seed),
                  resize="torch bilinear, antialias=True, align_corners=False, to input_size x input_size")
    save_file(_tiny_state_dict(config, seed), str(out_dir / TINY_WEIGHTS_FILE))
    (out_dir / TINY_CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")


class TinyFeatureExtractor(FeatureExtractor):
    """The embedded demo extractor: uint8 images → 64×64 bilinear (antialiased) → [-1, 1] → TinyConvNet → (N, 64)."""

    name = "tiny-conv-fid"

    def __init__(self, net: TinyConvNet, input_size: int, batch_size: int = 32, device: str | torch.device = "cpu"):
        super().__init__(batch_size, device)
        self.net = net.to(self.device).eval()
        self.input_size = int(input_size)
        self.dim = int(net.layers[-1].out_channels)

    @classmethod
    def load(cls, model_dir: str | Path, batch_size: int = 32, device: str | torch.device = "cpu"
             ) -> TinyFeatureExtractor:
        """The extractor :func:`build_tiny_extractor` wrote to ``model_dir``."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        for name in (TINY_CONFIG_FILE, TINY_WEIGHTS_FILE):
            if not (model_dir / name).is_file():
                raise MissingInputError(
                    f"{model_dir / name}: tiny FID extractor file not found; build it with "
                    f"pipeline.photorealism.features.build_tiny_extractor({str(model_dir)!r}, seed)")
        config = json.loads((model_dir / TINY_CONFIG_FILE).read_text())
        if config.get("architecture") != TINY_CONFIG["architecture"]:
            raise WeightsError(f"{model_dir / TINY_CONFIG_FILE}: architecture {config.get('architecture')!r}, "
                               f"expected {TINY_CONFIG['architecture']!r}")
        net = TinyConvNet(config["channels"], config["kernel_size"], config["stride"])
        net.load_state_dict(load_file(str(model_dir / TINY_WEIGHTS_FILE)), strict=True)
        return cls(net, config["input_size"], batch_size, device)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(torch.float32) / 255.0
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True)
        return self.net(x * 2.0 - 1.0)


# ---------------------------------------------------------------------------------------------- by params


def open_extractor(kind: str, folder: str | Path, inception_weights: str | None = None, seed: int = 0,
                   build: bool = False, batch_size: int = 32, device: str | torch.device = "cpu"
                   ) -> tuple[FeatureExtractor, dict[str, object]]:
    """The extractor ``profiles.<p>.fid.extractor`` names, and its identity (name, dim, weights SHA-256).

    ``embedded``: the tiny CNN in ``folder`` (written there first with ``seed`` when ``build``);
    ``inception``: torch-fidelity's Inception-v3 from ``inception_weights`` (None: the default location).
    Reference and generated statistics are comparable only when both identities are equal.
    """
    if kind == "embedded":
        if build:
            build_tiny_extractor(folder, seed)
        extractor: FeatureExtractor = TinyFeatureExtractor.load(folder, batch_size, device)
        digest = sha256_of_file(Path(folder) / TINY_WEIGHTS_FILE)
    elif kind == "inception":
        inception = InceptionFeatureExtractor(inception_weights, batch_size=batch_size, device=device)
        extractor, digest = inception, inception.weights_sha256
    else:
        raise ValueError(f"fid.extractor: {kind!r} is not 'embedded' or 'inception'")
    return extractor, {"name": extractor.name, "dim": extractor.dim, "weights_sha256": digest}
