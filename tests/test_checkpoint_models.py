"""Checkpoints and backbones as models: step_<N> keys, the checkpoint export, edit backbones from params."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from pipeline.compare.by_step import base_model, step_models
from pipeline.config import ConfigError, InputDataError, load_params
from pipeline.eval_models import edit_backbone, eval_model, step_key, step_of
from pipeline.training import checkpoints
from pipeline.training.export import export_checkpoint, find_checkpoint
from pipeline.zoo.sd import TINY_UNET

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def params() -> dict:
    return load_params(REPO / "params.yaml")


def test_step_keys_round_trip_and_other_keys_are_not_steps():
    assert step_key(8000) == "step_8000" and step_of("step_8000") == 8000
    assert step_of("trained") is None and step_of("step_") is None and step_of("step_x1") is None


def test_a_step_model_is_the_profile_sd_model_with_the_exported_unet(params):
    model, ref = eval_model(params, "step_10")
    assert model.dep == "artifacts/train/steps/10" and model.sampler == "sd"
    assert ref.model == params["profiles"][params["profile"]]["sd_model"]
    assert ref.unet == "artifacts/train/steps/10/unet" and "step 10" in ref.note


def test_edit_backbones_take_the_evaluation_model_references(params):
    backbone = edit_backbone(params, "tokencompose_a")
    ref = params["profiles"][params["profile"]]["eval_models"]["tokencompose_a"]
    assert (backbone.model, backbone.unet) == (ref["model"], ref["unet"])
    assert edit_backbone(params, "step_20").unet == "artifacts/train/steps/20/unet"


def test_edit_backbone_refuses_a_wrong_dep_and_a_non_sd_sampler(params):
    wrong = {**params, "edit_backbones": {**params["edit_backbones"], "trained": {"dep": "artifacts/models"}}}
    with pytest.raises(ConfigError, match="edit_backbones.trained.dep is artifacts/models, but eval_models.trained"):
        edit_backbone(wrong, "trained")
    ae = {**params, "edit_backbones": {"attend_excite": {"dep": "artifacts/models"}}}
    with pytest.raises(ConfigError, match="samples with 'attend_excite'"):
        edit_backbone(ae, "attend_excite")


def _checkpoint(root: Path, fingerprint: str, step: int, ema: bool) -> tuple[Path, UNet2DConditionModel]:
    torch.manual_seed(step)
    unet = UNet2DConditionModel(**TINY_UNET)
    opt = torch.optim.AdamW(unet.parameters())
    shadow = None
    if ema:
        shadow = EMAModel(unet.parameters(), model_cls=type(unet), model_config=unet.config)
        for param in shadow.shadow_params:
            param.data.add_(1.0)  # EMA weights that differ from the raw ones
    path = checkpoints.save_checkpoint(root / fingerprint, step, unet, opt, {"step": step, "fingerprint": fingerprint},
                                       ema=shadow)
    return path, unet


def test_export_copies_the_unet_and_records_step_and_run(tmp_path):
    path, unet = _checkpoint(tmp_path / "ck", "abc123", 10, ema=False)
    state = export_checkpoint(path, tmp_path / "steps" / "10")
    out = tmp_path / "steps" / "10"
    assert state == {"step": 10, "fingerprint": "abc123", "ema": False}
    assert json.loads((out / "state.json").read_text()) == state
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert not list(tmp_path.joinpath("steps").glob(".tmp-*"))


def test_export_of_an_ema_run_writes_the_ema_weights(tmp_path):
    path, unet = _checkpoint(tmp_path / "ck", "abc123", 20, ema=True)
    export_checkpoint(path, tmp_path / "out")
    exported = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    raw = unet.state_dict()
    name = next(k for k in exported if k.endswith("conv_in.weight"))
    assert torch.allclose(exported[name], raw[name] + 1.0)


def test_find_checkpoint_names_the_kept_steps_and_the_fixes(tmp_path):
    root = tmp_path / "ck"
    _checkpoint(root, "abc123", 10, ema=False)
    run = {"fingerprint": "abc123", "steps": 30}
    assert find_checkpoint(root, run, 10) == root / "abc123" / "checkpoint-10"
    with pytest.raises(InputDataError, match=r"keeps steps \[10\].*checkpoint_every.*dvc repro -f -s train"):
        find_checkpoint(root, run, 20)
    with pytest.raises(InputDataError, match="outside the training run"):
        find_checkpoint(root, run, 40)


def test_by_step_rows_put_the_base_first_and_trained_last(params):
    prof = params["profiles"]["demo"]
    base = base_model(params["eval_models"], prof["eval_models"], prof["sd_model"])
    assert base == "sd14"  # plain SD sampling of the model the train stage starts from
    assert step_models(base, [20, 10], 30) == [(0, "sd14"), (10, "step_10"), (20, "step_20"), (30, "trained")]
    assert step_models(None, [30], 30) == [(30, "step_30")]  # the last checkpoint is the trained UNet


def test_checkpoint_steps_are_checked_against_the_profile_before_training(params):
    from pipeline.params_check import check_checkpoint_steps

    assert check_checkpoint_steps(params) == [10, 20]
    assert check_checkpoint_steps({**params, "checkpoint_steps": [30]}) == [30]  # the last step
    paper = {**params, "profile": "paper"}
    with pytest.raises(ConfigError, match=r"checkpoint_steps \[10, 20\] .* 8000, 16000, 24000\); set e.g. "
                                          r"-S 'checkpoint_steps=\[8000, 16000\]'"):
        check_checkpoint_steps(paper)
    assert check_checkpoint_steps({**paper, "checkpoint_steps": [8000, 16000]}) == [8000, 16000]
    with pytest.raises(ConfigError, match=r"\[25, 0\]"):
        check_checkpoint_steps({**params, "checkpoint_steps": [10, 25, 0]})


def test_by_step_rows_carry_fid_and_clip_score_per_reference_set(tmp_path):
    """A model with metrics/fid/<model>.json gets fid_<set> and clip_score_<set>; one without gets empty cells."""
    import json

    from pipeline.compare.by_step import by_step_table

    (tmp_path / "fid").mkdir()
    (tmp_path / "fid" / "trained.json").write_text(json.dumps(
        {"coco": {"fid": 20.5, "clip_score": 31.0}, "flickr30k": {"fid": 70.0, "clip_score": 30.0}}))
    (tmp_path / "visor").mkdir()
    (tmp_path / "visor" / "sd14.json").write_text(json.dumps({"oa": 29.9, "visor_uncond": 17.5, "visor_cond": 58.5}))
    table = by_step_table(tmp_path, [(0, "sd14"), (30, "trained")], ["coco"], ["coco", "flickr30k"])
    assert table.loc[1, ["fid_coco", "fid_flickr30k", "clip_score_coco"]].tolist() == [20.5, 70.0, 31.0]
    assert table.loc[0, ["fid_coco", "clip_score_flickr30k"]].isna().all()
    assert table.loc[0, ["visor_oa", "visor_uncond", "visor_cond"]].tolist() == [29.9, 17.5, 58.5]
    assert table.loc[1, ["visor_oa"]].isna().all()
