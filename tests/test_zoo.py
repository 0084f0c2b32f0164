"""Embedded models: deterministic weights, save/load round trip, the real CLIP tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline import models, zoo
from pipeline.store.identity import state_dict_hash


def test_clip_tokenizer_matches_sd14_ids(clip_tokenizer):
    assert clip_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip_tokenizer) == 49408
    padded = clip_tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407  # SD1.4 pads with <|endoftext|>


def test_clip_tokenizer_multi_token_words(clip_tokenizer):
    # Pieces as SPEC §6.3 lists them for the first official MultiGen prompt.
    ids = clip_tokenizer("a photo of a book, a cup, a kite, a mouse, and a surfboard.").input_ids
    pieces = [clip_tokenizer.decode([i]).strip() for i in ids[18:20]]
    assert pieces == ["surf", "board"]


def test_tiny_sd_is_deterministic_and_round_trips(tmp_path, tiny_sd):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    other = zoo.build("tiny-sd", tmp_path / "again", seed=0)
    for sub, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        a = cls.from_pretrained(tiny_sd / sub)
        b = cls.from_pretrained(other / sub)
        assert state_dict_hash(a) == state_dict_hash(b)
    different = zoo.build("tiny-sd", tmp_path / "seed1", seed=1)
    assert state_dict_hash(UNet2DConditionModel.from_pretrained(different / "unet")) != state_dict_hash(
        UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    )


def test_tiny_sd_keeps_sd14_cross_attention_layout(tiny_sd):
    from diffusers import UNet2DConditionModel

    from pipeline.zoo.sd import SD14_UNET

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    cross = [n for n in unet.attn_processors if "attn2" in n]
    assert len(cross) == 16 and len(unet.attn_processors) == 32
    count = lambda prefix: sum(n.startswith(prefix) for n in cross)  # noqa: E731
    assert [count(f"down_blocks.{i}.") for i in range(3)] == [2, 2, 2]
    assert [count(f"up_blocks.{i}.") for i in range(1, 4)] == [3, 3, 3]
    assert count("mid_block.") == 1
    assert unet.config.down_block_types == list(SD14_UNET["down_block_types"])


def test_pipeline_loads_by_reference_and_samples(tiny_sd):
    pipe = models.load_sd_pipeline("embedded:tiny-sd", tiny_sd.parent)
    gen = torch.Generator().manual_seed(0)
    image = pipe("a photo of a cat", num_inference_steps=2, generator=gen, output_type="np").images
    assert image.shape == (1, 128, 128, 3)
    swapped = models.load_sd_pipeline("embedded:tiny-sd", tiny_sd.parent, unet_ref=str(tiny_sd / "unet"))
    assert state_dict_hash(swapped.unet) == state_dict_hash(pipe.unet)


def test_reference_errors_are_actionable(tmp_path):
    with pytest.raises(models.ModelLoadError, match="run `dvc repro models`"):
        models.resolve("embedded:tiny-sd", tmp_path)
    with pytest.raises(models.ModelLoadError, match=r"embedded:nope: not built at .*list 'nope' in "
                                                     r"profiles.<profile>.embedded and run `dvc repro models`"):
        models.resolve("embedded:nope", tmp_path)
    with pytest.raises(ValueError, match="an embedded model is embedded:NAME"):
        models.parse_ref("embedded:../outside")
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.resolve(str(tmp_path / "missing"), tmp_path)
    assert models.parse_ref("CompVis/stable-diffusion-v1-4").kind == "hub"
    assert models.resolve("CompVis/stable-diffusion-v1-4", tmp_path) == "CompVis/stable-diffusion-v1-4"


def test_mistyped_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """"runs/unett" looks like an org/name hub id; its first folder exists here, so it is a missing local path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert models.parse_ref("runs/unett").kind == "local"
    with pytest.raises(models.ModelLoadError, match="local model path does not exist"):
        models.resolve("runs/unett", tmp_path)


def test_uncached_hub_unet_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(models.ModelLoadError, match=r"hf download mlpc-lab/TokenCompose_SD14_A`\) and set HF_HOME"):
        models.load_unet("mlpc-lab/TokenCompose_SD14_A", tmp_path)


def test_pinned_hub_revision_loads_that_snapshot(tiny_sd, tmp_path, monkeypatch):
    """``ORG/NAME@SHA`` loads that commit from the hub cache; the bare id loads what ``main`` points to."""
    import shutil

    from diffusers import UNet2DConditionModel

    old, new = "1" * 40, "2" * 40
    repo = tmp_path / "hf" / "hub" / "models--lab--unet-repo"
    shutil.copytree(tiny_sd / "unet", repo / "snapshots" / old / "unet")
    changed = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    with torch.no_grad():
        changed.conv_out.bias.add_(1.0)
    changed.save_pretrained(repo / "snapshots" / new / "unet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)

    pinned = models.load_unet(f"lab/unet-repo@{old}", tmp_path)
    latest = models.load_unet("lab/unet-repo", tmp_path)
    assert state_dict_hash(pinned) == state_dict_hash(models.load_unet(str(tiny_sd), tmp_path))
    assert state_dict_hash(latest) == state_dict_hash(changed)
    assert models.parse_ref(f"lab/unet-repo@{old}") == models.ModelRef(f"lab/unet-repo@{old}", "hub",
                                                                         "lab/unet-repo", old)
    with pytest.raises(models.ModelLoadError, match=f"hf download lab/unet-repo --revision {'3' * 40}"):
        models.load_unet(f"lab/unet-repo@{'3' * 40}", tmp_path)
    for bad in ("lab/unet-repo@", "lab/unet-repo@a@b"):
        with pytest.raises(ValueError, match="ORG/NAME@REVISION"):
            models.parse_ref(bad)


def test_bare_unet_folder_and_pipeline_folder_both_load(tiny_sd):
    """A UNet reference may name a pipeline (its unet/) or a UNet saved on its own."""
    from_pipeline = models.load_unet(str(tiny_sd), tiny_sd.parent)
    bare = models.load_unet(str(tiny_sd / "unet"), tiny_sd.parent)
    assert state_dict_hash(from_pipeline) == state_dict_hash(bare)


@pytest.mark.slow
def test_sd14_architecture_parameter_count():
    from pipeline.zoo.sd import build_sd14_unet

    unet = build_sd14_unet(seed=0)
    n = sum(p.numel() for p in unet.parameters())
    assert 859_000_000 < n < 861_000_000  # SD1.4 UNet: 859.52M parameters
    assert sum("attn2" in k for k in unet.attn_processors) == 16


def test_state_dict_hash_covers_scalars_and_dtypes():
    a = torch.nn.Module()
    a.register_buffer("scale", torch.tensor(2.0))
    b = torch.nn.Module()
    b.register_buffer("scale", torch.tensor(2.0, dtype=torch.float64))
    c = torch.nn.Module()
    c.register_buffer("scale", torch.tensor(3.0))
    assert len({state_dict_hash(m) for m in (a, b, c)}) == 3


def test_tiny_vae_scaling_gives_unit_variance_latents(tiny_sd):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae")
    gen = torch.Generator().manual_seed(1)  # other images than the calibration batch
    coarse = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=128, mode="bilinear", align_corners=False)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    assert 0.7 < float(latents.std()) < 1.4


def test_builds_do_not_depend_on_the_offline_setting(tmp_path):
    """DVC hashes the models folder: an environment variable must not change its bytes."""
    import os
    import subprocess
    import sys

    for value in ("1", "0"):  # the hub reads the variable at import: build in fresh processes
        code = f"from pipeline import zoo; zoo.build('tiny-sd', {str(tmp_path / value)!r}, seed=0)"
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": value})
    files = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / "1" / rel).read_bytes() == (tmp_path / "0" / rel).read_bytes(), rel


def test_models_stage_refuses_an_unknown_name_before_touching_its_output(tmp_path):
    """A misspelt embedded model is a one-line error naming the known ones, raised before the stage replaces
    artifacts/models (the only folder it writes: a fixed path, not a param)."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profiles"]["demo"]["embedded"] = ["tiny-sd", "tiny-sdd"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    built = tmp_path / "artifacts" / "models" / "tiny-sd"
    built.mkdir(parents=True)
    (built / "model_index.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "TOKENCOMPOSE_TRACEBACK"}
    proc = subprocess.run([sys.executable, str(repo / "stages/models.py")], cwd=tmp_path, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 1 and "profiles.demo.embedded: ['tiny-sdd'] are not embedded models" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "tiny-sd," in proc.stderr
    assert (built / "model_index.json").read_text() == "{}"


@pytest.mark.parametrize("name,device,expected", [
    ("auto", "cpu", torch.float32), ("auto", "cuda", torch.float16), ("auto", "cuda:1", torch.float16),
    ("float16", "cpu", torch.float16), ("bfloat16", "cuda", torch.bfloat16), ("float32", "cuda", torch.float32)])
def test_inference_dtype_is_the_one_reading_of_dtype_params(name, device, expected):
    """``auto`` is float16 on CUDA only; a named dtype is taken as given (no GPU is needed to resolve it)."""
    assert models.inference_dtype(name, device) == expected
