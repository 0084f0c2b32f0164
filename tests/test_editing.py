"""Blended Latent Diffusion (SPEC §4, Appendix A) on the embedded tiny Stable Diffusion."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.datasets.piebench_files import decode_mask
from pipeline.editing import (BlendedLatentEditor, EditingCfg, EditItem, bld_scheduler, blended_latent_loop,
                              decode_latents, edit_rows, encode_prompts, encode_source, latent_mask, source_tensor)
from pipeline.models import load_sd_pipeline
from pipeline.seeding import derive_seed
from pipeline.store.codecs import image_from_bytes
from pipeline.store.shards import read_shards, write_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe(tiny_sd, models_dir):
    return load_sd_pipeline(str(tiny_sd), models_dir)


@pytest.fixture(scope="module")
def calibrated_pipe(tiny_sd, models_dir):
    """tiny-sd with its VAE scaling factor set so source latents have unit std, as SD's 0.18215 does.

    The random tiny VAE's latents have std ~0.045 at factor 0.18215, so the t = 0 residual noise of the
    last blend (std 0.029, SPEC §4.1) would be as large as the signal; with calibrated latents it is as
    small relative to the signal as in SD1.4.
    """
    pipe = load_sd_pipeline(str(tiny_sd), models_dir)
    with torch.no_grad():
        raw = pipe.vae.encode(torch.stack([source_tensor(scene(s), 128) for s in range(8)])).latent_dist.mean
    pipe.vae.register_to_config(scaling_factor=float(1 / raw.std()))
    return pipe


def scene(seed: int, size: int = 128) -> Image.Image:
    """A smooth random RGB image (low frequencies, so the VAE round trip is meaningful)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def box_mask(size: int = 128, lo: int = 32, hi: int = 96) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[lo:hi, lo:hi] = 1
    return mask


class UNetSpy:
    """Records (timestep, batch size, input latents) of every UNet forward."""

    def __init__(self, unet):
        self.calls: list[tuple[int, int, torch.Tensor]] = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, _module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.calls.append((int(t), sample.shape[0], sample.detach().clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run_loop(pipe, cfg: EditingCfg, masks: torch.Tensor, seed_key: str = "img", steps: int = 10):
    """Encode a source, run the loop with a known generator; returns (z_src, final z, spy calls)."""
    editor = BlendedLatentEditor(pipe, cfg, steps, seed=0)
    z_src = encode_source(pipe.vae, source_tensor(scene(1), editor.resolution)[None])
    text = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red ball"])
    gens = [torch.Generator().manual_seed(editor.image_seed(seed_key))]
    with UNetSpy(pipe.unet) as spy:
        z = blended_latent_loop(pipe.unet, editor.scheduler, z_src, masks, text, gens, cfg, steps)
    return editor, z_src, z, spy.calls


def test_spec_rle_example_via_shared_decoder():
    # SPEC §5.3: RLE [5, 3] on a 4x4 grid, then the forced border.
    expected = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1]], np.uint8)
    np.testing.assert_array_equal(decode_mask([5, 3], size=4), expected)
    np.testing.assert_array_equal(decode_mask([5, 3], size=4, force_border=False)[1], [0, 1, 1, 1])


@pytest.mark.parametrize("size,latent", [(512, 64), (128, 16), (512, 16)])
def test_forced_border_never_reaches_latent_mask(size, latent):
    border_only = decode_mask([], size=size)
    assert border_only.sum() == 4 * size - 4
    assert latent_mask(border_only, latent).sum() == 0


def test_latent_mask_is_pil_nearest_sampling_of_centres():
    # NEAREST from 512 to 64 picks pixel 8i + 4 (SPEC §4.2); checked on a random mask with NumPy slicing.
    mask = (np.random.default_rng(0).random((512, 512)) > 0.5).astype(np.uint8)
    got = latent_mask(mask, 64)[0].numpy()
    np.testing.assert_array_equal(got, mask[4::8, 4::8])
    with pytest.raises(ValueError, match="mask must be"):
        latent_mask(np.zeros((4, 4, 3)), 2)


def test_latent_mask_binarises_at_the_threshold():
    """A soft mask is cut at ``editing.mask_threshold`` (SPEC §4.1-4.2: 0.5), not at "any value > 0"."""
    soft = np.full((128, 128), 0.3, dtype=np.float32)
    assert latent_mask(soft, 16).sum() == 0
    assert latent_mask(soft, 16, threshold=0.25).sum() == 16 * 16
    assert latent_mask(np.full((128, 128), 0.5, np.float32), 16).sum() == 16 * 16  # >= threshold


def test_scheduler_is_the_bld_script_ddim():
    """The editor's scheduler: SD's scaled-linear betas (0.00085 -> 0.012), no clipping, no alpha-one final
    step, leading spacing from 0 (SPEC §4.1); its cumulative alphas equal a NumPy computation."""
    sched = bld_scheduler()
    assert sched.config.steps_offset == 0 and sched.config.set_alpha_to_one is False
    assert sched.config.clip_sample is False and sched.config.prediction_type == "epsilon"
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == list(range(980, -1, -20))
    assert math.isclose(float(sched.final_alpha_cumprod), 1 - 0.00085, rel_tol=1e-6)


@pytest.mark.parametrize("blend", ["after_step", "before_step"])
def test_loop_runs_38_cfg_unet_calls_at_740_to_0(pipe, blend):
    masks = latent_mask(box_mask(), 16)[None]
    _, _, _, calls = run_loop(pipe, EditingCfg(blend=blend), masks, steps=50)
    assert [t for t, _, _ in calls] == list(range(740, -1, -20))
    assert len(calls) == 38
    assert all(batch == 2 for _, batch, _ in calls)  # unconditional + conditional


def test_all_zero_mask_returns_the_vae_reconstruction(calibrated_pipe):
    pipe = calibrated_pipe
    zero = torch.zeros(1, 1, 16, 16)
    editor, z_src, z, _ = run_loop(pipe, EditingCfg(), zero)
    # Last blend at t = 0: z = sqrt(a0) z_src + sqrt(1 - a0) eps, a0 = 0.99915 -> noise std 0.029.
    a0 = 1 - 0.00085
    residual = (z - math.sqrt(a0) * z_src) / math.sqrt(1 - a0)
    assert abs(float(residual.std()) - 1.0) < 0.1 and abs(float(residual.mean())) < 0.1
    recon = decode_latents(pipe.vae, z_src).astype(np.float32)
    edit = decode_latents(pipe.vae, z).astype(np.float32)
    # Stated tolerance (uint8 grey levels): mean |edit - reconstruction| < 2.5, 99th percentile < 12.
    assert np.abs(edit - recon).mean() < 2.5 and np.percentile(np.abs(edit - recon), 99) < 12
    # The same loop with a full mask is free to move away from the source: the check above can fail.
    _, _, z_full, _ = run_loop(pipe, EditingCfg(), torch.ones(1, 1, 16, 16))
    assert np.abs(decode_latents(pipe.vae, z_full).astype(np.float32) - recon).mean() > 4 * np.abs(edit - recon).mean()


def test_init_variants_and_draw_order(pipe):
    zero = torch.zeros(1, 1, 16, 16)
    editor, z_src, _, calls = run_loop(pipe, EditingCfg(init="noise"), zero)
    gen = torch.Generator().manual_seed(editor.image_seed("img"))
    draws = [torch.randn((4, 16, 16), generator=gen)[None] for _ in range(3)]
    torch.testing.assert_close(calls[0][2][:1], draws[0])  # pure noise, first draw
    sched, (t0, t1) = editor.scheduler, [int(t) for t in editor.loop_timesteps()[:2]]
    assert (t0, t1) == (700, 600)  # 10 steps, blending start 0.25: timesteps[2:] of 900, 800, ..., 0
    # Default order (SD script, SPEC §4.1 5c): blend after each step, the background noised to the step's own
    # t (not the next one) with a fresh draw; with an empty mask call k >= 1 sees the source at t_{k-1}.
    torch.testing.assert_close(calls[1][2][:1], sched.add_noise(z_src, draws[1], torch.tensor([t0])))
    torch.testing.assert_close(calls[2][2][:1], sched.add_noise(z_src, draws[2], torch.tensor([t1])))
    _, _, _, calls = run_loop(pipe, EditingCfg(init="noised_source"), zero)
    expected = sched.add_noise(z_src, draws[0], torch.tensor([t0]))
    torch.testing.assert_close(calls[0][2][:1], expected)  # source noised in one step to the first loop t
    # LDM order: blend first; with an empty mask the UNet sees the source noised to t with draw 1, 2, ...
    _, _, _, calls = run_loop(pipe, EditingCfg(blend="before_step"), zero)
    torch.testing.assert_close(calls[0][2][:1], sched.add_noise(z_src, draws[1], torch.tensor([t0])))
    torch.testing.assert_close(calls[1][2][:1], sched.add_noise(z_src, draws[2], torch.tensor([t1])))


def test_final_latent_keeps_source_outside_mask_only(pipe):
    # The guarantee of latent blending is in latent space (the VAE decoder mixes globally: its mid block
    # has self-attention): outside the mask the final latent is the source noised to t = 0.
    masks = latent_mask(box_mask(lo=0, hi=64), 16)[None]  # latent rows/cols 0-7
    _, z_src, z, _ = run_loop(pipe, EditingCfg(), masks)
    a0 = 1 - 0.00085
    residual = ((z - math.sqrt(a0) * z_src) / math.sqrt(1 - a0))[0]
    outside, inside = residual[:, 8:, :], residual[:, :8, :8]
    assert abs(float(outside.std()) - 1) < 0.15 and abs(float(outside.mean())) < 0.15
    assert float(inside.abs().mean()) > 5  # edited: not the source plus t = 0 noise


def test_batch_and_seed_reproducibility(pipe):
    editor = BlendedLatentEditor(pipe, EditingCfg(), 6, seed=0)
    items = [EditItem(f"img{i}", scene(i), box_mask(), p) for i, p in enumerate(["a cat", "a dog"])]
    together = editor.edit(items)
    alone = editor.edit(items[1:2])[0]
    assert np.abs(together[1].astype(int) - alone).max() <= 1
    other_seed = BlendedLatentEditor(pipe, EditingCfg(), 6, seed=1).edit(items[1:2])[0]
    assert np.abs(other_seed.astype(int) - alone).mean() > 1


def test_each_image_draws_from_its_own_id(pipe):
    """The noise is keyed by image id (global seed, "bld", id), not by prompt or position: the same image
    and prompt under two ids edit differently, and an edit equals the loop run with that id's generator."""
    editor = BlendedLatentEditor(pipe, EditingCfg(), 6, seed=0)
    a, b = (EditItem(name, scene(3), box_mask(), "a red ball") for name in ("a", "b"))
    out_a, out_b = editor.edit([a, b])
    assert np.abs(out_a.astype(int) - out_b).mean() > 1
    assert editor.image_seed("a") == derive_seed(0, "bld", "a")
    z_src = encode_source(pipe.vae, source_tensor(a.image, editor.resolution)[None])
    text = encode_prompts(pipe.tokenizer, pipe.text_encoder, [a.prompt])
    masks = latent_mask(a.mask, editor.latent_size, 0.5)[None]
    gens = [torch.Generator().manual_seed(derive_seed(0, "bld", "a"))]
    direct = decode_latents(pipe.vae, blended_latent_loop(pipe.unet, editor.scheduler, z_src, masks, text, gens,
                                                          EditingCfg(), 6))[0]
    assert np.abs(direct.astype(int) - out_a).max() <= 1


def test_same_seed_mode_starts_every_image_from_the_same_noise(pipe):
    """``editing.seeds: same`` is the PIE-Bench editing scripts' convention (setup_seed(1234) before each
    image): two ids with the same image and prompt edit identically, and the seed is same_seed whatever the
    global seed; ``per_image`` keys it by id. Only the used seed enters the shard fingerprint."""
    from pipeline.editing import edit_fingerprint
    from pipeline.eval_models import Backbone

    same = BlendedLatentEditor(pipe, EditingCfg(seeds="same"), 6, seed=0)
    a, b = (EditItem(name, scene(3), box_mask(), "a red ball") for name in ("a", "b"))
    out_a, out_b = same.edit([a, b])
    assert np.abs(out_a.astype(int) - out_b).max() <= 1
    assert same.image_seed("a") == same.image_seed("b") == 1234
    assert BlendedLatentEditor(pipe, EditingCfg(seeds="same"), 6, seed=7).image_seed("a") == 1234
    assert BlendedLatentEditor(pipe, EditingCfg(seeds="same", same_seed=5), 6, seed=0).image_seed("a") == 5
    per_image = BlendedLatentEditor(pipe, EditingCfg(), 6, seed=0)
    assert per_image.image_seed("a") != per_image.image_seed("b")
    backbone = Backbone("embedded:tiny-sd")
    moved = BlendedLatentEditor(pipe, EditingCfg(same_seed=5), 6, seed=0)
    assert edit_fingerprint(per_image, backbone, "/nonexistent") == edit_fingerprint(moved, backbone, "/nonexistent")
    assert edit_fingerprint(same, backbone, "/nonexistent") != edit_fingerprint(
        BlendedLatentEditor(pipe, EditingCfg(seeds="same", same_seed=5), 6, seed=0), backbone, "/nonexistent")


def test_edit_rows_keep_bad_inputs_and_resume_identically(pipe, tmp_path):
    editor = BlendedLatentEditor(pipe, EditingCfg(), 4, seed=0)
    records = [(f"img{i}", i) for i in range(5)]

    def load(image_id, i):
        if i == 2:
            raise FileNotFoundError(f"{image_id}.jpg missing")
        return EditItem(image_id, scene(i), box_mask(), "a red ball")

    def process(chunk):
        return edit_rows(editor, chunk, load, batch_size=2)

    out = tmp_path / "edits"
    write_shards(out, records, process, shard_size=2, fingerprint={"v": 1}, code="test")
    first = read_shards(out)
    assert list(first["image_id"]) == [r[0] for r in records]
    assert list(first["status"]) == ["ok", "ok", "bad_input", "ok", "ok"]
    assert "missing" in first.loc[2, "error"] and first.loc[2, "image"] is None
    assert image_from_bytes(first.loc[0, "image"]).size == (128, 128)
    assert first.loc[0, "mask_fraction"] == pytest.approx(0.25)
    assert [int(s) for s in first["seed"]] == [derive_seed(0, "bld", r[0]) for r in records]  # the seed used
    (out / "part-00001.parquet").unlink()  # a killed run: resume writes the same bytes
    write_shards(out, records, process, shard_size=2, fingerprint={"v": 1}, code="test")
    again = read_shards(out)
    assert list(again["image"]) == list(first["image"])


def test_edit_failure_becomes_a_row(pipe):
    editor = BlendedLatentEditor(pipe, EditingCfg(), 5, seed=0)
    good = EditItem("ok", scene(0), box_mask(), "a cat")
    bad = EditItem("bad", scene(1), np.ones((3, 3, 3)), "a cat")  # not an (H, W) mask
    rows = edit_rows(editor, [("ok", good), ("bad", bad)], lambda _id, item: item, batch_size=2)
    assert [r["status"] for r in rows] == ["ok", "edit_failed"]
    assert "mask must be" in rows[1]["error"] and rows[1]["image"] is None and rows[0]["image"]


def _edit_project(root: Path, tiny_sd: Path) -> Path:
    """A scratch project for `stages/edit.py base`: the repository's params (demo, shard size 1, 10 steps),
    three drawn PIE-Bench scenes, and the embedded models."""
    import yaml

    from pipeline.datasets.demo_piebench import write_demo_piebench

    root.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profiles"]["demo"]["editing"].update(shard_size=1, batch_size=1, num_inference_steps=10)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_demo_piebench(root / "artifacts/data/piebench", 3, seed=0, size=512)
    os.symlink(tiny_sd.parent, root / "artifacts/models")
    return root


def test_edit_stage_under_two_processes_equals_one_process(tiny_sd, tmp_path):
    """torchrun with two CPU ranks: the ranks split the three shards (not both doing all of them), and the
    shards and metrics equal a one-process run's."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = str(REPO / "stages/edit.py")
    runs = {}
    for processes in (1, 2):
        root = _edit_project(tmp_path / f"p{processes}", tiny_sd)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               script, "sd14"]
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = root
    # progress bars of the two-process run: rank 0 edits shards 0 and 2, rank 1 shard 1; nobody all three
    assert "| 2/2" in done.stderr and "| 1/1" in done.stderr and "| 3/3" not in done.stderr, done.stderr[-2000:]
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        one, two = (runs[n] / "artifacts/edits/sd14" / name for n in (1, 2))
        assert one.read_bytes() == two.read_bytes()
    m1, m2 = (json.loads((runs[n] / "metrics/edit/sd14.json").read_text()) for n in (1, 2))
    assert m1 == m2 and m1["ok"] == 3


def test_source_tensor_maps_0_255_to_minus_1_1():
    img = Image.fromarray(np.tile(np.array([0, 255, 51], np.uint8), (4, 4, 1)))
    assert source_tensor(img, 4)[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, -0.6])


def test_decode_latents_rounds_to_the_nearest_level(pipe):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    expected = ((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(decode_latents(pipe.vae, z), expected)


def test_guidance_follows_the_conditional_branch(pipe):
    """eps = eps_u + g (eps_c - eps_u) with the unconditional (empty prompt) half first: at g = 1 the result
    does not depend on the unconditional embedding at all."""
    cfg = EditingCfg(guidance_scale=1.0)
    editor = BlendedLatentEditor(pipe, cfg, 4, seed=0)
    z_src = encode_source(pipe.vae, source_tensor(Image.new("RGB", (128, 128), (90, 30, 200)), 128)[None])
    masks = latent_mask(np.ones((128, 128), np.uint8), 16)[None]
    text = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red ball"])
    torch.testing.assert_close(text[:1], encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])[:1])
    other = text.clone()
    other[0] = torch.randn_like(other[0])

    def run(embeddings):
        gens = [torch.Generator().manual_seed(1)]
        return blended_latent_loop(pipe.unet, editor.scheduler, z_src, masks, embeddings, gens, cfg, 4)

    torch.testing.assert_close(run(text), run(other))


def test_source_tensor_resizes_bilinear():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    want = np.asarray(img.resize((16, 16), Image.BILINEAR), np.float32) / 127.5 - 1
    np.testing.assert_allclose(source_tensor(img, 16).permute(1, 2, 0).numpy(), want, atol=1e-6)


def test_loop_steps_are_ddim_with_eta_0(pipe):
    """With an all-ones mask blending is a no-op, so the loop must equal plain DDIM (eta 0) written out in
    float64: x0 = (z - sqrt(1 - a) eps) / sqrt(a), z' = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, with
    classifier-free guidance and a_prev = alphas_cumprod[0] after the last step (set_alpha_to_one false)."""
    cfg, steps = EditingCfg(), 4
    editor = BlendedLatentEditor(pipe, cfg, steps, seed=0)
    z_src = encode_source(pipe.vae, source_tensor(Image.new("RGB", (128, 128), (90, 30, 200)), 128)[None])
    ones = torch.ones(1, 1, 16, 16)
    emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red ball"])
    got = blended_latent_loop(pipe.unet, editor.scheduler, z_src, ones, emb, [torch.Generator().manual_seed(3)],
                              cfg, steps)
    alphas = editor.scheduler.alphas_cumprod.double()
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3)).double()
    for t in [750, 500, 250, 0][int(steps * cfg.blending_start):]:
        with torch.no_grad():
            uncond, cond = pipe.unet(torch.cat([z, z]).float(), t, encoder_hidden_states=emb).sample.double().chunk(2)
        eps = uncond + cfg.guidance_scale * (cond - uncond)
        a, a_prev = alphas[t], (alphas[t - 250] if t >= 250 else alphas[0])
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got.double(), z, atol=1e-4, rtol=1e-4)
