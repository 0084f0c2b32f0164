"""Evaluation-model references: what each model of the evaluation ``foreach`` stages is and where its weights are.

``eval_models.<key>`` (every profile) names the DVC dependency that holds a model's weights and its sampler;
``profiles.<p>.eval_models.<key>`` names the references loaded (base pipeline, optional UNet)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, section
from pipeline.paths import MODELS_DIR

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


def eval_model(params: dict[str, Any], key: str) -> tuple[EvalModel, EvalModelRef]:
    """``eval_models.<key>`` and ``profiles.<p>.eval_models.<key>``, checked against each other.

    Unless ``dep`` (the folder DVC tracks for the model's weights) is the models folder, it must hold the
    ``unet`` or the ``model`` that is loaded: a checkpoint named in ``dep`` with ``unet: null`` would be
    sampled and scored as the base model under the checkpoint's name."""
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
