"""FLOPs of the benchmarked work, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device.

The models are the ones the GPU benchmarks run: SD1.4's UNet, VAE and CLIP text encoder built by
:mod:`pipeline.zoo.sd` (``arch="sd14"``), or the embedded tiny model (``arch="tiny"``, for tests). They are
built on the ``meta`` device, so counting takes no memory and no compute: the counter sees every
matmul, convolution and attention op of the real forward (and backward) at the real shapes. Nothing here
is typed by hand; the number of UNet evaluations of a sampling run comes from the scheduler itself.

Counted (FLOPs = 2 x multiply-adds, the counter's convention): convolutions, linear layers and the
attention matmuls. Elementwise work (norms, activations, softmax, the grounding losses' gathers and sums,
AdamW) is not counted, as usual for model FLOPs. Gradient checkpointing's recomputed forward is not
counted either: MFU counts the model's FLOPs, not the extra work a memory-saving setting adds.

    python bench/flops.py            # prints the SD1.4 counts at 512 px (batch 1)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TEXT_TOKENS = 77  # CLIP's context: every prompt is padded to it
CAPTURED = ("mid_8", "up_16", "up_32", "up_64")  # the cross-attention groups the grounding losses read
CONV_OPS = ("aten.convolution", "aten.convolution_backward", "aten._convolution")

# Dense (no structured sparsity) peak throughput in TFLOP/s, keyed by the name `nvidia-smi --query-gpu=name`
# and `torch.cuda.get_device_name()` print (the "device" / "device_name" of bench/results/*_cuda*.json).
# Sources: NVIDIA H100 Tensor Core GPU datasheet (columns "H100 SXM" and "H100 PCIe") and NVIDIA H200
# Tensor Core GPU datasheet (column "H200 SXM"). The datasheets quote the tensor-core TF32, BF16 and FP16
# figures with 2:4 sparsity (H100 SXM and H200: 989 / 1,979 / 1,979; H100 PCIe: 756 / 1,513 / 1,513); the
# dense figures below are half of them. fp32 is the non-tensor-core FP32 figure (67, 67 and 51).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},  # H100 SXM5
    "NVIDIA H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "NVIDIA H200": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},  # H200 SXM
}


@dataclass(frozen=True)
class Flops:
    """FLOPs per aten op (``"aten.convolution"`` -> count); adds and scales by integers like a number."""

    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All counted FLOPs."""
        return sum(self.by_op.values())

    @property
    def conv(self) -> int:
        """FLOPs of convolutions (forward and backward): cuDNN's share of the work."""
        return sum(v for k, v in self.by_op.items() if k in CONV_OPS)

    def __add__(self, other: "Flops") -> "Flops":
        keys = sorted(set(self.by_op) | set(other.by_op))
        return Flops({k: self.by_op.get(k, 0) + other.by_op.get(k, 0) for k in keys})

    def __mul__(self, n: int) -> "Flops":
        return Flops({k: v * n for k, v in self.by_op.items()})

    __rmul__ = __mul__


def count(fn: Callable[[], object]) -> Flops:
    """The FLOPs ``fn()`` runs, per aten op, as ``FlopCounterMode`` counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return Flops({str(op): int(n) for op, n in sorted(counter.get_flop_counts()["Global"].items(),
                                                      key=lambda kv: str(kv[0])) if n})


@lru_cache(maxsize=2)
def meta_models(arch: str = "sd14") -> dict:
    """UNet (trainable), VAE and text encoder (frozen) of ``arch`` (``sd14`` or ``tiny``) on the meta device."""
    from pipeline.zoo.sd import SD14_TEXT, SD14_UNET, SD14_VAE, TINY_TEXT, TINY_UNET, TINY_VAE, build_sd_components

    configs = {"sd14": (SD14_UNET, SD14_VAE, SD14_TEXT), "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT)}[arch]
    with torch.device("meta"):
        parts = build_sd_components(*configs)
    for frozen in (parts["vae"], parts["text_encoder"]):
        frozen.requires_grad_(False).eval()
    return parts


def vae_scale(arch: str = "sd14") -> int:
    """Pixels per latent cell: 2 ** (VAE levels - 1) (8 for SD1.4)."""
    return 2 ** (len(meta_models(arch)["vae"].config.block_out_channels) - 1)


def _unet_inputs(arch: str, batch: int, resolution: int):
    parts = meta_models(arch)
    unet, side = parts["unet"], resolution // vae_scale(arch)
    latents = torch.zeros(batch, unet.config.in_channels, side, side, device="meta")
    states = torch.zeros(batch, TEXT_TOKENS, unet.config.cross_attention_dim, device="meta")
    steps = torch.zeros(batch, dtype=torch.long, device="meta")
    return unet, latents, steps, states


def _sdpa(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


@lru_cache(maxsize=None)
def unet_forward_flops(batch: int = 1, resolution: int = 512, guidance: bool = False, arch: str = "sd14") -> Flops:
    """One UNet forward for ``batch`` images at ``resolution`` px with 77 text tokens; with classifier-free
    ``guidance`` the UNet runs on the conditional and the unconditional half at once (batch doubled)."""
    unet, latents, steps, states = _unet_inputs(arch, batch * (2 if guidance else 1), resolution)
    _sdpa(unet)

    def forward():
        with torch.no_grad():
            unet(latents, steps, states)

    return count(forward)


@lru_cache(maxsize=None)
def unet_train_flops(batch: int = 1, resolution: int = 512, arch: str = "sd14") -> Flops:
    """UNet forward and backward of one training micro-batch, as the training step runs it.

    The grounding losses' cross-attention groups are captured (:func:`pipeline.attention.capture_cross_attention`:
    explicit softmax in those layers, SDPA elsewhere) and the loss depends on the prediction and on the
    captured maps, so the backward takes the paths the real loss's takes. The latents carry no gradient
    (the VAE is frozen), so the first convolution computes its weight gradient only, as in training.
    """
    from pipeline.attention import capture_cross_attention, restore_attention

    unet, latents, steps, states = _unet_inputs(arch, batch, resolution)
    store = capture_cross_attention(unet, CAPTURED)

    def step():
        pred = unet(latents, steps, states).sample
        loss = torch.nn.functional.mse_loss(pred.float(), latents)
        for maps in store.maps.values():
            loss = loss + sum(m.float().mean() for m in maps)
        loss.backward()

    try:
        return count(step)
    finally:
        store.reset()
        restore_attention(unet)
        _sdpa(unet)


@lru_cache(maxsize=None)
def text_encoder_flops(sequences: int = 1, arch: str = "sd14") -> Flops:
    """CLIP text encoder forward of ``sequences`` prompts of 77 tokens."""
    encoder = meta_models(arch)["text_encoder"]
    ids = torch.zeros(sequences, TEXT_TOKENS, dtype=torch.long, device="meta")

    def forward():
        with torch.no_grad():
            encoder(ids)

    return count(forward)


@lru_cache(maxsize=None)
def vae_encode_flops(batch: int = 1, resolution: int = 512, arch: str = "sd14") -> Flops:
    """VAE encoder (to the posterior's parameters) of ``batch`` RGB images at ``resolution`` px."""
    vae = meta_models(arch)["vae"]
    pixels = torch.zeros(batch, vae.config.in_channels, resolution, resolution, device="meta")

    def forward():
        with torch.no_grad():
            vae.encode(pixels)

    return count(forward)


@lru_cache(maxsize=None)
def vae_decode_flops(batch: int = 1, resolution: int = 512, arch: str = "sd14") -> Flops:
    """VAE decoder of ``batch`` latents to images of ``resolution`` px."""
    vae = meta_models(arch)["vae"]
    side = resolution // vae_scale(arch)
    latents = torch.zeros(batch, vae.config.latent_channels, side, side, device="meta")

    def forward():
        with torch.no_grad():
            vae.decode(latents)

    return count(forward)


def train_step_flops(batch: int = 1, resolution: int = 512, cached_latents: bool = True,
                     arch: str = "sd14") -> dict[str, Flops]:
    """What one training step of ``batch`` samples runs (``bench/train_step.py``, ``Trainer``), by part.

    Keys: ``text_encoder`` (forward of the captions), ``vae_encoder`` (only when latents are not cached;
    with the cache the step only samples the kept posterior), ``unet`` (forward and backward with capture)
    and ``total``.
    """
    parts = {"text_encoder": text_encoder_flops(batch, arch)}
    if not cached_latents:
        parts["vae_encoder"] = vae_encode_flops(batch, resolution, arch)
    parts["unet"] = unet_train_flops(batch, resolution, arch)
    parts["total"] = sum(parts.values(), Flops())
    return parts


def unet_evaluations(steps: int = 50) -> int:
    """UNet evaluations of a ``steps``-step run of SD1.4's own scheduler (PNDM, PLMS only: ``steps + 1``)."""
    from diffusers import PNDMScheduler

    from pipeline.zoo.sd import SD14_SCHEDULER

    scheduler = PNDMScheduler(**SD14_SCHEDULER)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def sampling_flops(batch: int = 1, steps: int = 50, resolution: int = 512, guidance: bool = True,
                   prompts: int | None = None, arch: str = "sd14") -> dict[str, Flops]:
    """What one pipeline call producing ``batch`` images runs, by part (``bench/sampling_throughput.py``).

    Keys: ``text_encoder`` (each prompt and, with ``guidance``, its empty negative prompt; ``prompts=None``:
    one prompt per image, as the seeded sampler passes them; diffusers' ``num_images_per_prompt`` encodes
    a prompt once), ``unet`` (the scheduler's evaluations, each on the conditional and unconditional batch),
    ``vae_decoder`` and ``total``.
    """
    sequences = (batch if prompts is None else prompts) * (2 if guidance else 1)
    parts = {"text_encoder": text_encoder_flops(sequences, arch),
             "unet": unet_forward_flops(batch, resolution, guidance, arch) * unet_evaluations(steps),
             "vae_decoder": vae_decode_flops(batch, resolution, arch)}
    parts["total"] = sum(parts.values(), Flops())
    return parts


def fp32_math() -> dict[str, bool]:
    """Whether this process runs fp32 convolutions (cuDNN) and matmuls (cuBLAS) on TF32 tensor cores."""
    return {"conv_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


# torch's defaults (unchanged by this project): cuDNN convolutions in TF32, cuBLAS matmuls in full FP32
TORCH_DEFAULT_FP32_MATH = {"conv_tf32": True, "matmul_tf32": False}


def peak_tflops(device_name: str, precision: str, flops: Flops,
                fp32_math_flags: dict[str, bool] | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s for ``flops`` run in ``precision`` on ``device_name``, what the peak is made of).

    ``precision`` is ``bf16``, ``fp16`` or ``fp32``. For bf16/fp16 every counted op runs on tensor cores at
    that dtype's peak. For fp32 the op mix decides: convolutions run at the TF32 peak when cuDNN may use
    TF32 (torch's default), matmuls at the FP32 peak unless cuBLAS may use TF32 (torch's default: not), so
    the peak is the rate at which the mix would run if each op ran at its own peak:
    total / (conv / conv_peak + other / other_peak). ``(None, reason)`` for a GPU not in ``PEAK_TFLOPS``.
    """
    table = PEAK_TFLOPS.get(device_name)
    if table is None:
        return None, f"no peak for {device_name!r} in bench/flops.py PEAK_TFLOPS"
    if precision in ("bf16", "fp16"):
        return table[precision], f"{precision} dense"
    if precision != "fp32":
        raise ValueError(f"precision {precision!r}: bf16, fp16 or fp32")
    flags = fp32_math_flags or TORCH_DEFAULT_FP32_MATH
    conv_kind = "tf32" if flags["conv_tf32"] else "fp32"
    other_kind = "tf32" if flags["matmul_tf32"] else "fp32"
    seconds = flops.conv / (table[conv_kind] * 1e12) + (flops.total - flops.conv) / (table[other_kind] * 1e12)
    basis = f"fp32 mix: convolutions at the {conv_kind} peak, matmuls at the {other_kind} peak"
    return flops.total / seconds / 1e12, basis


def main() -> None:
    """Print the SD1.4 counts at 512 px in TFLOP (batch 1)."""
    train, sample = train_step_flops(cached_latents=False), sampling_flops()
    out = {"unet_forward": unet_forward_flops().total, "unet_forward_cfg": unet_forward_flops(guidance=True).total,
           **{f"train_step_{k}": v.total for k, v in train.items()},
           **{f"sampling_image_{k}": v.total for k, v in sample.items()}}
    print(json.dumps({k: round(v / 1e12, 4) for k, v in out.items()}, indent=1))
    print(json.dumps({"unet_evaluations_50_steps": unet_evaluations(50)}))


if __name__ == "__main__":
    main()
