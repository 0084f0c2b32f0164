"""Model references: Hugging Face ids, local directories and ``embedded:NAME`` (DESIGN §4).

Every model parameter in ``params.yaml`` is a string:

* ``CompVis/stable-diffusion-v1-4``: a Hugging Face id (needs the hub cache or network); with
  ``@REVISION`` (``CompVis/stable-diffusion-v1-4@<commit sha>``, a branch or a tag) pinned to that revision;
* ``/data/sd14`` or ``artifacts/train/unet``: a local directory in the same ``save_pretrained`` layout;
* ``embedded:tiny-sd``: a model from :mod:`pipeline.zoo`, written by the ``models`` stage to
  ``artifacts/models/tiny-sd`` (:data:`pipeline.paths.MODELS_DIR`). This module never imports the zoo: stages load what
  the ``models`` stage wrote, so they depend on its output and not on the zoo's code.

:func:`resolve` turns any of them into what ``from_pretrained`` takes, so there is one loading path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.config import ConfigError, DtypeName, StageError
from pipeline.store.identity import state_dict_hash

EMBEDDED_PREFIX = "embedded:"


def inference_dtype(name: DtypeName, device: torch.device | str) -> torch.dtype:
    """The torch dtype of an inference-dtype param: ``auto`` is float16 on CUDA and float32 elsewhere (CPU
    kernels for half are slow or missing); any other name is that torch dtype, on any device."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


class ModelLoadError(StageError, RuntimeError):
    """A model reference could not be loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference."""

    raw: str
    kind: Literal["embedded", "local", "hub"]
    name: str  # embedded name, local path or hub id
    revision: str | None = None  # hub ids only: the commit, branch or tag after "@"


def parse_ref(ref: str) -> ModelRef:
    """Classify ``ref`` as embedded, local directory or hub id."""
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"model reference must be a non-empty string, got {ref!r}")
    if ref.startswith(EMBEDDED_PREFIX):
        name = ref[len(EMBEDDED_PREFIX):]
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"{ref!r}: an embedded model is embedded:NAME, NAME one of the models stage's builds")
        return ModelRef(ref, "embedded", name)
    path = Path(ref).expanduser()
    first = Path(ref.split("/")[0])
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") != 1 or first.is_dir():
        return ModelRef(ref, "local", str(path))  # "artifacts/train" is a (maybe missing) folder, not a hub id
    repo, at, revision = ref.partition("@")
    if at and not (repo.count("/") == 1 and all(repo.split("/")) and revision and "@" not in revision):
        raise ConfigError(f"{ref!r}: a pinned hub id is ORG/NAME@REVISION (a commit sha, branch or tag)")
    return ModelRef(ref, "hub", repo, revision or None)


def hub_kwargs(ref: str) -> dict[str, str]:
    """``{"revision": ...}`` for a pinned hub id (``ORG/NAME@REVISION``), else ``{}``."""
    parsed = parse_ref(ref)
    return {"revision": parsed.revision} if parsed.revision else {}


def resolve(ref: str, models_dir: str | Path) -> str:
    """What ``from_pretrained`` should receive for ``ref``.

    Raises :class:`ModelLoadError` when an embedded model has not been built or a local path is missing.
    """
    parsed = parse_ref(ref)
    if parsed.kind == "embedded":
        path = Path(models_dir) / parsed.name
        if not path.is_dir():
            raise ModelLoadError(
                f"{ref}: not built at {path}; list {parsed.name!r} in profiles.<profile>.embedded and run "
                f"`dvc repro models` (tests: pipeline.zoo.build)"
            )
        return str(path)
    if parsed.kind == "local":
        if not Path(parsed.name).exists():
            raise ModelLoadError(f"{ref}: local model path does not exist")
        return parsed.name
    return parsed.name


def quiet_loading() -> None:
    """Turn off transformers' and diffusers' progress bars for loading and saving weights ("Loading
    weights", "Loading pipeline components", "Writing model shards"): stages load several models each, and
    their own bars already say how far the work is."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def from_pretrained(cls: Any, ref: str, models_dir: str | Path, **kwargs: Any) -> Any:
    """``cls.from_pretrained(resolve(ref), **kwargs)`` with an error that says how to fix a failed load."""
    quiet_loading()
    target = resolve(ref, models_dir)
    try:
        return cls.from_pretrained(target, **hub_kwargs(ref), **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"could not load {cls.__name__} from {ref!r} ({target}): {err}; "
                             f"{load_hint(ref, target)}") from err


def load_hint(ref: str, target: str) -> str:
    """How to fix a failed load of ``ref``: download a hub id, or check a local folder's layout."""
    parsed = parse_ref(ref)
    if parsed.kind == "hub":
        pin = f" --revision {parsed.revision}" if parsed.revision else ""
        return (f"download it once where there is network (`hf download {target}{pin}`) and set HF_HOME, "
                f"or point the parameter at a local directory (no folder {ref} exists here, so it was "
                f"taken for a hub id)")
    return "check that the directory holds a save_pretrained layout"


def unet_location(ref: str, models_dir: str | Path) -> tuple[str, str | None]:
    """(path or id, subfolder) of a UNet reference: a pipeline folder (``<ref>/unet``) or a UNet folder."""
    target = resolve(ref, models_dir)
    local = Path(target)
    if local.is_dir():
        return (str(local / "unet"), None) if (local / "unet").is_dir() else (str(local), None)
    return target, "unet"


def load_unet(ref: str, models_dir: str | Path, torch_dtype: torch.dtype = torch.float32):
    """Load a ``UNet2DConditionModel`` from a pipeline folder/id (its ``unet/``) or a bare UNet folder."""
    from diffusers import UNet2DConditionModel

    quiet_loading()
    path, subfolder = unet_location(ref, models_dir)
    pin = hub_kwargs(ref)
    try:
        return UNet2DConditionModel.from_pretrained(path, dtype=torch_dtype, **pin,
                                                    **({"subfolder": subfolder} if subfolder else {}))
    except (OSError, ValueError) as err:
        if subfolder:  # a hub repo that holds a bare UNet, not a pipeline
            try:
                return UNet2DConditionModel.from_pretrained(path, dtype=torch_dtype, **pin)
            except (OSError, ValueError):
                pass
        raise ModelLoadError(f"could not load a UNet from {ref!r} ({path}): {err}; {load_hint(ref, path)}") from err


def load_sd_pipeline(
    ref: str,
    models_dir: str | Path,
    unet_ref: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    pipeline_cls: Any = None,
):
    """A Stable Diffusion pipeline from ``ref``, optionally with the UNet of ``unet_ref`` swapped in.

    This is how the released TokenCompose checkpoints and the UNet trained here are evaluated: the base
    pipeline's VAE, text encoder, tokenizer and scheduler with the fine-tuned UNet. The safety checker is
    not loaded (MultiGen counts objects; a blacked-out image would count as a miss).
    """
    from diffusers import StableDiffusionPipeline

    pipeline_cls = pipeline_cls or StableDiffusionPipeline
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "safety_checker": None, "requires_safety_checker": False}
    if unet_ref is not None:
        kwargs["unet"] = load_unet(unet_ref, models_dir, torch_dtype)
    pipe = from_pretrained(pipeline_cls, ref, models_dir, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


COMPILE_BACKEND = "inductor"  # torch.compile backend of compile_unet (tests use "aot_eager": no code generation)


def compile_unet(unet: torch.nn.Module, channels_last: bool = False, backend: str | None = None) -> torch.nn.Module:
    """Compile ``unet``'s forward in place with ``torch.compile`` (``nn.Module.compile``); returns ``unet``.

    The module object, its parameters and its ``state_dict`` keys stay the same, so it trains, saves and
    hashes exactly as before; only the forward runs as compiled kernels (same results up to float
    rounding). Attention processors installed before the call (capture included) are traced into the
    compiled graph. ``channels_last`` also stores conv weights NHWC (faster convolutions on tensor cores).
    Shapes are static (``dynamic=False``): the first forward of each new input shape compiles anew rather
    than switching to slower dynamic-shape kernels; on CUDA, for the same reason, cuDNN benchmarks its
    convolution algorithms once per shape (``cudnn.benchmark``). A UNet already compiled is left as it is.
    """
    if getattr(unet, "_compiled_call_impl", None) is not None:
        return unet
    if next(unet.parameters()).device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.compile(backend=backend or COMPILE_BACKEND, dynamic=False)
    return unet


def component_hashes(pipe: Any) -> dict[str, str]:
    """SHA-256 of the UNet, VAE and text encoder weights (what sampled images depend on)."""
    return {name: state_dict_hash(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder")}
