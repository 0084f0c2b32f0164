"""Evaluation-model references: what each model of the evaluation ``foreach`` stages is and where its weights are.

``eval_models.<key>`` (every profile) names the DVC dependency that holds a model's weights and its sampler;
``profiles.<p>.eval_models.<key>`` names the references loaded (base pipeline, optional UNet).
A training checkpoint is the model ``step_<N>``: the profile's ``sd_model`` with the UNet that stage
``checkpoint@<N>`` exported to ``artifacts/train/steps/<N>/unet`` (``checkpoint_steps`` lists them).
``edit_backbones.<key>`` picks the evaluation models the editing stages use, by the same keys."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, profile_fields, section
from pipeline.paths import MODELS_DIR, STEPS_DIR

log = logging.getLogger(__name__)

SamplerKind = Literal["sd", "attend_excite"]


@dataclass(frozen=True)
class EvalModel:
    """``eval_models.<key>`` (the ``foreach`` of the evaluation stages): what a model is, in every profile."""

    dep: str                          # the DVC dependency holding its weights
    sampler: SamplerKind = "sd"


@dataclass(frozen=True)
class EvalModelRef:
    """``profiles.<p>.eval_models.<key>``: the model references of one evaluated model."""

    model: str                        # base pipeline (hub id, local dir or embedded:NAME)
    unet: str | None = None           # a UNet swapped into the base pipeline (TokenCompose, trained here)
    note: str = ""                    # recorded in metrics (e.g. "stand-in for ...")


@dataclass(frozen=True)
class TrainedBase:
    """``profiles.<p>.sd_model``: the pipeline whose UNet the train stage fine-tunes."""

    sd_model: str


STEP_PREFIX = "step_"  # model key of a training checkpoint: step_<N>


def step_key(step: int) -> str:
    """The model key of the checkpoint at training step ``step``: ``step_<step>``."""
    return f"{STEP_PREFIX}{int(step)}"


def step_of(key: str) -> int | None:
    """The training step of a checkpoint model key (``step_8000`` -> 8000), else None."""
    tail = key[len(STEP_PREFIX):] if key.startswith(STEP_PREFIX) else ""
    return int(tail) if tail.isdigit() else None


def step_model(params: dict[str, Any], step: int) -> tuple[EvalModel, EvalModelRef]:
    """The checkpoint at ``step`` as an evaluation model: plain SD sampling of the profile's ``sd_model`` (the
    model the train stage fine-tunes) with the checkpoint's UNet swapped in."""
    folder = STEPS_DIR / str(step)
    sd_model = profile_fields(params, TrainedBase).sd_model
    return (EvalModel(dep=folder.as_posix(), sampler="sd"),
            EvalModelRef(model=sd_model, unet=(folder / "unet").as_posix(),
                         note=f"checkpoint at training step {step} of the train stage's run"))


def eval_model(params: dict[str, Any], key: str) -> tuple[EvalModel, EvalModelRef]:
    """``eval_models.<key>`` and ``profiles.<p>.eval_models.<key>``, checked against each other; a checkpoint
    key ``step_<N>`` needs neither (:func:`step_model`).

    Unless ``dep`` (the folder DVC tracks for the model's weights) is the models folder, it must hold the
    ``unet`` or the ``model`` that is loaded: a checkpoint named in ``dep`` with ``unet: null`` would be
    sampled and scored as the base model under the checkpoint's name."""
    if step_of(key) is not None:
        return step_model(params, step_of(key))
    model = section(params, f"eval_models.{key}", EvalModel)
    ref = section(params, f"profile.eval_models.{key}", EvalModelRef)
    dep = Path(model.dep).resolve()
    if dep == MODELS_DIR.resolve():
        return model, ref
    loaded = [r for r in (ref.unet, ref.model) if r and not r.startswith("embedded:")]
    if not any(dep == Path(r).resolve() or dep in Path(r).resolve().parents for r in loaded):
        raise ConfigError(f"eval_models.{key}.dep is {model.dep}, but profiles.<p>.eval_models.{key} loads model "
                          f"{ref.model!r} with unet {ref.unet!r}, neither of which lies in it: the weights DVC "
                          f"tracks would not be the ones sampled. Point its unet (or model) at {model.dep}")
    return model, ref


def checkpoint_of(unet: str | None,
                  trained_run: str | Path = "artifacts/train/unet/training_run.json") -> dict[str, Any]:
    """``unet_checkpoint_step`` and ``unet_checkpoint_fingerprint`` of a UNet inside a training checkpoint
    (``<key>/checkpoint-<step>/unet``, whose ``state.json`` names the training run), else ``{}``.

    Every training run keeps its checkpoints under its own key, so a checkpoint may come from another run
    than the one of ``artifacts/train/unet``: a fingerprint other than ``trained_run``'s is logged."""
    state_file = Path(unet).parent / "state.json" if unet and not unet.startswith("embedded:") else None
    if state_file is None or not state_file.is_file():
        return {}
    state = json.loads(state_file.read_text())
    found = {"unet_checkpoint_step": int(state["step"]), "unet_checkpoint_fingerprint": state.get("fingerprint")}
    trained = Path(trained_run)
    current = json.loads(trained.read_text()).get("fingerprint") if trained.is_file() else None
    if current is not None and current != found["unet_checkpoint_fingerprint"]:
        log.warning("%s comes from the training run %s, not from the run of the trained UNet in this workspace "
                    "(%s, %s): its checkpoints were written by another experiment", unet,
                    found["unet_checkpoint_fingerprint"], current, trained)
    return found


@dataclass(frozen=True)
class Backbone:
    """A backbone to edit with: a Stable Diffusion pipeline reference and an optional UNet swapped in."""

    model: str
    unet: str | None = None


@dataclass(frozen=True)
class EditBackbone:
    """``edit_backbones.<key>`` (the ``foreach`` of the edit and piebench stages): the DVC dependency that
    holds the weights of evaluation model ``<key>``."""

    dep: str


def edit_backbone(params: dict[str, Any], key: str) -> Backbone:
    """The backbone of ``edit_backbones.<key>`` (or of checkpoint ``step_<N>``): the references of evaluation
    model ``<key>``, which must be a plain Stable Diffusion model whose weights lie in the entry's ``dep``."""
    model, ref = eval_model(params, key)
    if step_of(key) is None:
        entry = section(params, f"edit_backbones.{key}", EditBackbone)
        if Path(entry.dep).resolve() != Path(model.dep).resolve():
            raise ConfigError(f"edit_backbones.{key}.dep is {entry.dep}, but eval_models.{key}.dep is {model.dep}: "
                              f"DVC would track other weights than the ones edited with; use {model.dep}")
    if model.sampler != "sd":
        raise ConfigError(f"edit_backbones.{key}: evaluation model {key!r} samples with {model.sampler!r}; "
                          f"an editing backbone is a plain Stable Diffusion model (sampler: sd)")
    return Backbone(model=ref.model, unet=ref.unet)
