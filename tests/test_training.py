"""Training: data join, transforms, data order, the loop on the tiny model, resume, failure handling."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.store.codecs import rle_decode, rle_encode
from pipeline.store.identity import state_dict_hash
from pipeline.store.shards import iter_rows, write_shards
from pipeline.training import checkpoints
from pipeline.training import step as training_step
from pipeline.training import trainer
from pipeline.training.data import StreamBatchSampler, image_tensor
from pipeline.training.losses import LossCfg
from pipeline.training.settings import OptimCfg, TrainCfg, TrainRun, TrainScale
from pipeline.training.sources import load_records, object_mask_records

RES = 128
LAYERS = ["mid_8", "up_16", "up_32", "up_64"]


def masks_rows(images_dir: Path, tokenizer, resolution: int) -> list[dict]:
    """``artifacts/masks`` rows from the demo images' true masks (one per object), plus broken rows."""
    rows = []
    for split in ("train", "heldout"):
        records, unaligned = object_mask_records(images_dir, tokenizer, resolution, split)
        assert unaligned == 0
        rows += [dict(image_id=r.image_id, caption=r.caption, phrase=w.phrase, token_indices=w.token_indices,
                      mask=None, train_mask=w.train_mask, box=None, score=None, status="ok", error="")
                 for r in records for w in r.words]
    rows[0].update(status="no_detection", error="nothing detected", train_mask=None)
    rows[1].update(train_mask=None)
    return rows


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory, clip_tokenizer):
    """Demo images (12, 3 held out) and mask rows; the last train image keeps no mask (ungrounded)."""
    from pipeline.datasets.demo_images import write_demo_training_set

    root = tmp_path_factory.mktemp("data")
    images, masks = root / "images", root / "masks"
    write_demo_training_set(images, num_images=12, image_size=RES, seed=0, shard_size=6, heldout_fraction=0.25)
    rows = masks_rows(images, clip_tokenizer, RES)
    train_ids = sorted(r["image_id"] for r in iter_rows(images) if r["split"] == "train")
    rows = [r for r in rows if r["image_id"] != train_ids[-1]]
    write_shards(masks, rows, lambda chunk: chunk, 8, fingerprint="fixture", code="test")
    return images, masks


def make_run(out_dir: Path, tiny_sd: Path, **scale) -> TrainRun:
    sizes = dict(batch_size=2, grad_accum=2, max_steps=4, checkpoint_every=2)
    sizes.update(scale)
    return TrainRun(
        sd_model=str(tiny_sd), models_dir=tiny_sd.parent, resolution=RES, seed=0,
        loss=LossCfg(token_weight=1e-3, pixel_weight=5e-5, layers=LAYERS),
        optim=OptimCfg(lr=1e-4, weight_decay=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, max_grad_norm=1.0),
        train=TrainCfg(checkpoint_limit=2), scale=TrainScale(**sizes), out_dir=out_dir,
    )


def run_key(out_dir: Path, result: trainer.TrainResult) -> Path:
    """The checkpoint folder of the run that produced ``result``: ``checkpoints/<run fingerprint>``."""
    return out_dir / "checkpoints" / result.metrics["fingerprint"]


# ------------------------------------------------------------------------------------------ data

def test_load_records_joins_masks_and_counts_reasons(data_dirs):
    images, masks = data_dirs
    records, stats = load_records(images, masks, RES)
    train_ids = {r["image_id"] for r in iter_rows(images) if r["split"] == "train" and r["status"] == "ok"}
    assert {r.image_id for r in records} == train_ids and len(records) == 9
    assert stats["images_other_split"] == 3
    assert stats["words_skipped_mask_status_no_detection"] == 1
    assert stats["words_skipped_no_train_mask"] == 1
    held = stats.get("words_skipped_image_not_in_train_split", 0)
    total_rows = sum(1 for _ in iter_rows(masks))
    assert stats["words_used"] + held + 2 == total_rows
    assert stats["images_ungrounded"] >= 1
    assert all(w.token_indices and w.train_mask["size"] == [RES, RES] for r in records for w in r.words)
    grounded, g_stats = load_records(images, masks, RES, skip_ungrounded=True)
    assert len(grounded) == stats["images_grounded"] and all(r.words for r in grounded)


def damaged_images(images: Path, out: Path, count: int) -> list[str]:
    """A copy of the images shards at ``out`` whose first ``count`` ok training images are truncated PNGs
    (status still ok, the Parquet files intact); returns their ids."""
    rows = list(iter_rows(images))
    victims = [r for r in rows if r["split"] == "train" and r["status"] == "ok"][:count]
    for row in victims:
        row["image"] = row["image"][: len(row["image"]) // 2]
    write_shards(out, rows, lambda chunk: chunk, 6, fingerprint="fixture", code="test")
    return [r["image_id"] for r in victims]


def test_undecodable_training_images_are_counted_in_one_line(data_dirs, tmp_path, caplog):
    """Bytes that do not decode (truncated PNGs with status ok) are a counted skip below the limit, with one
    warning line naming the count, the first ids and the repair; not a DataLoader crash."""
    import logging

    images, masks = data_dirs
    victims = damaged_images(images, tmp_path / "images", 2)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.sources"):
        records, stats = load_records(tmp_path / "images", masks, RES, max_corrupt_rate=0.25)
    clean, clean_stats = load_records(images, masks, RES, max_corrupt_rate=0.0)
    assert stats["images_corrupt"] == 2 and clean_stats["images_corrupt"] == 0
    assert {r.image_id for r in records} == {r.image_id for r in clean} - set(victims)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"2 of 9 training images in {tmp_path / 'images'} do not decode and are left out (first: " \
           f"{victims[0]}, {victims[1]})" in warnings[0] and "`dvc repro train_data`" in warnings[0]


def test_undecodable_training_images_past_the_limit_fail_naming_the_repair(data_dirs, tmp_path):
    """Past ``train.max_corrupt_rate`` the loader fails with one line: the count, the first ids, the producer's
    repair command and the param; the default limit (params.yaml, 1 %) refuses even one of 9 images."""
    from pipeline.config import InputDataError, load_params, section

    images, masks = data_dirs
    victims = damaged_images(images, tmp_path / "images", 1)
    limit = section(load_params(Path(__file__).resolve().parents[1] / "params.yaml"), "train",
                    TrainCfg).max_corrupt_rate
    assert limit == TrainCfg().max_corrupt_rate == 0.01
    with pytest.raises(InputDataError) as err:
        load_records(tmp_path / "images", masks, RES, max_corrupt_rate=limit)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"1 of 9 training images in {tmp_path / 'images'} do not decode (first: {victims[0]}; "
                       "limit train.max_corrupt_rate=1.0%); repair them with `dvc repro train_data` (it recomputes "
                       "damaged shards), or raise train.max_corrupt_rate")
    with pytest.raises(InputDataError, match=r"1 of 9 training images"):
        load_records(tmp_path / "images", masks, RES, max_corrupt_rate=0.11)  # 1/9 = 11.1 %
    _, stats = load_records(tmp_path / "images", masks, RES, max_corrupt_rate=0.12)
    assert stats["images_corrupt"] == 1


def test_resume_takes_the_latest_checkpoint_of_this_run_within_max_steps(tmp_path):
    """A shorter rerun (max_steps below the newest checkpoint) resumes from an earlier one, never a later one."""
    for step, fingerprint in ((2, "run"), (4, "run"), (6, "other")):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    assert checkpoints.find_resume(tmp_path, "run", max_steps=10) == tmp_path / "checkpoint-4"
    assert checkpoints.find_resume(tmp_path, "run", max_steps=3) == tmp_path / "checkpoint-2"
    assert checkpoints.find_resume(tmp_path, "run", max_steps=1) is None
    assert checkpoints.find_resume(tmp_path, "another", max_steps=10) is None


def test_run_dir_is_one_plain_folder_per_key(tmp_path):
    """A key folder is ``<root>/<fingerprint>``; a fingerprint that would leave the root is refused."""
    assert checkpoints.run_dir(tmp_path, "0123abcd") == tmp_path / "0123abcd"
    for bad in ("../up", "a/b", "", "."):
        with pytest.raises(ValueError, match="not a plain folder name"):
            checkpoints.run_dir(tmp_path, bad)


def test_v_prediction_target_is_the_velocity():
    """v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0 (Salimans & Ho 2022), abar from the scheduler's table."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    x0, eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).chunk(2)
    t = torch.tensor([500])
    abar = scheduler.alphas_cumprod.numpy()[500]
    want = np.sqrt(abar) * eps.numpy() - np.sqrt(1 - abar) * x0.numpy()
    np.testing.assert_allclose(training_step._target(scheduler, x0, eps, t).numpy(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(training_step._target(DDPMScheduler(), x0, eps, t), eps)


def test_empty_masks_train_towards_zero_or_are_skipped(data_dirs, tmp_path, clip_tokenizer):
    """empty_mask / outside_crop rows (empty train_mask) and blank_mask rows (no mask stored) are words with an
    all-zero target by default, as the original trained them; ``empty_masks="skip"`` leaves them out."""
    images, _ = data_dirs
    rows = masks_rows(images, clip_tokenizer, RES)[2:]
    empty = rle_encode(np.zeros((RES, RES), dtype=bool))
    changed = {0: ("empty_mask", empty), 1: ("outside_crop", empty), 2: ("blank_mask", None)}
    for i, (status, mask) in changed.items():
        rows[i].update(status=status, error=status, train_mask=mask)
    masks = tmp_path / "masks"
    write_shards(masks, rows, lambda chunk: chunk, 8, fingerprint="fixture", code="test")
    records, stats = load_records(images, masks, RES)
    words = {(r.image_id, w.phrase): w for r in records for w in r.words}
    for i in changed:
        word = words[(rows[i]["image_id"], rows[i]["phrase"])]
        assert word.token_indices == rows[i]["token_indices"]
        assert rle_decode(word.train_mask).shape == (RES, RES) and not rle_decode(word.train_mask).any()
    assert stats["words_zero_target"] == 3 and not any(k.startswith("words_skipped_mask") for k in stats)
    skipped, s_stats = load_records(images, masks, RES, empty_masks="skip")
    assert s_stats["words_used"] == stats["words_used"] - 3 and s_stats["words_zero_target"] == 0
    assert all(s_stats[f"words_skipped_mask_status_{status}"] == 1 for status, _ in changed.values())
    with pytest.raises(ValueError, match="empty_masks"):
        load_records(images, masks, RES, empty_masks="drop")


def test_load_records_refuses_masks_of_another_resolution(data_dirs):
    images, masks = data_dirs
    records, stats = load_records(images, masks, 64)
    assert stats["words_used"] == 0 and stats["words_skipped_train_mask_size"] > 0
    with pytest.raises(ValueError, match=r"do not fit them .*train_mask_size.*rerun `dvc repro masks`"):
        load_records(images, masks, 64, max_word_skip_rate=0.01)


def test_word_skip_limit_counts_only_mismatches(data_dirs):
    """The fixture drops one ok row for a mismatch (no train mask) and others for expected reasons (no
    detection, held-out image): the limit compares the mismatch with the joinable rows only."""
    images, masks = data_dirs
    _, stats = load_records(images, masks, RES)
    share = 1 / (stats["words_used"] + 1)
    load_records(images, masks, RES, max_word_skip_rate=share)
    with pytest.raises(ValueError, match=r"1 of \d+ mask rows .*no_train_mask"):
        load_records(images, masks, RES, max_word_skip_rate=share * 0.99)


def test_image_transform_resizes_shorter_side_and_center_crops():
    """A 100x150 (H x W) image: the crop keeps the middle columns, values in [-1, 1]."""
    arr = np.zeros((100, 150, 3), np.uint8)
    arr[:, :25] = 255  # a white band at the left edge, cropped away (crop starts at column 25 of 150)
    arr[:, 70:80] = 255  # a centre band, kept
    out = image_tensor(Image.fromarray(arr), 64)
    assert out.shape == (3, 64, 64) and out.min() >= -1 and out.max() <= 1
    assert out[:, :, 1:4].max() < -0.9  # left band gone (column 0 is blurred by the antialiased resize)
    assert out[0, 32, 30:34].max() > 0.5  # centre band at the centre


def test_stream_sampler_epochs_ranks_and_resume():
    n = 7
    full = list(StreamBatchSampler(n, 2, seed=3, start=0, count=14))
    flat = [i for b in full for i in b]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    assert flat[:7] != flat[7:14]  # a new permutation per epoch
    assert list(StreamBatchSampler(n, 2, seed=3, start=5, count=9)) == full[5:]
    ranks = [list(StreamBatchSampler(n, 1, seed=3, start=0, count=7, rank=r, world=2)) for r in (0, 1)]
    merged = [i for pair in zip(*ranks) for b in pair for i in b]
    assert merged == flat[:14]  # two ranks of batch 1 walk the same stream as one of batch 2


# ------------------------------------------------------------------------------------------ loop

def test_train_tiny_end_to_end_and_load_into_pipeline(data_dirs, tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    from pipeline.models import load_sd_pipeline

    records, _ = load_records(*data_dirs, RES)
    result = trainer.train(make_run(tmp_path, tiny_sd), records)
    assert [r["step"] for r in result.curves] == [1, 2, 3, 4]
    for key in ["loss", "denoise", "token", "pixel"] + [f"{k}_{g}" for k in ("token", "pixel") for g in LAYERS]:
        assert all(np.isfinite(r[key]) for r in result.curves), key
    assert result.curves[0]["token"] > 0 and result.this_run["samples_this_run"] == 16
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [result.metrics["fingerprint"]]
    assert [p.name for _, p in checkpoints.list_checkpoints(run_key(tmp_path, result))] == ["checkpoint-2",
                                                                                         "checkpoint-4"]
    base = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    trained = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert state_dict_hash(base) != state_dict_hash(trained)
    pipe = load_sd_pipeline(str(tiny_sd), tiny_sd.parent, unet_ref=str(tmp_path / "unet"))
    image = pipe("a red ball", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (RES, RES, 3) and np.isfinite(image).all()


def test_denoising_objective_is_epsilon_mse_at_uniform_timesteps():
    """SPEC §1.5: noise ~ N(0, I) and t ~ U{0..999} per sample, the UNet sees add_noise(z, noise, t), and the
    denoising loss is the MSE between its prediction and the noise (epsilon target)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    calls = []

    def unet(x, t, states):
        calls.append((x, t))
        return SimpleNamespace(sample=0.5 * x)

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    latents = torch.randn(512, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    loss_cfg = LossCfg(token_weight=0.0, pixel_weight=0.0, layers=[])
    out = training_step.compute_losses(unet, sched, latents, torch.zeros(512, 77, 8), None, None, loss_cfg,
                                  torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=gen)
    steps = torch.randint(0, 1000, (512,), generator=gen)
    (x, t), = calls
    assert torch.equal(t, steps) and int(t.min()) < 50 and int(t.max()) > 950
    torch.testing.assert_close(x, sched.add_noise(latents, noise, steps))
    torch.testing.assert_close(out.denoise, torch.nn.functional.mse_loss(0.5 * x, noise))
    assert out.total is out.denoise and out.grounding is None


def test_latents_are_a_scaled_posterior_sample(tiny_sd):
    """Training latents: a sample of the VAE posterior (not its mean) times the VAE's scaling factor."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae")
    models = training_step.SDModels(vae=vae, text_encoder=CLIPTextModel.from_pretrained(tiny_sd / "text_encoder"),
                               unet=None, noise_scheduler=None, tokenizer=None)
    pixels = torch.rand(2, 3, RES, RES) * 2 - 1
    latents, states = training_step.encode_batch(models, pixels, torch.zeros(2, 77, dtype=torch.long),
                                            torch.Generator().manual_seed(3))
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    expected = dist.sample(generator=torch.Generator().manual_seed(3)) * vae.config.scaling_factor
    assert vae.config.scaling_factor != 1.0
    torch.testing.assert_close(latents, expected)
    assert not torch.allclose(latents, dist.mean * vae.config.scaling_factor)
    assert states.shape[:2] == (2, 77)


def test_gradients_are_clipped_before_every_optimizer_step(data_dirs, tiny_sd, tmp_path, monkeypatch):
    """SPEC §1.5: clip_grad_norm_ at max_grad_norm before each optimizer step (the tiny model's gradients
    are far larger than 1e-3, so every recorded norm is the clipped one)."""
    norms = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    records, _ = load_records(*data_dirs, RES)
    run = make_run(tmp_path, tiny_sd, max_steps=2)
    run = replace(run, optim=replace(run.optim, max_grad_norm=1e-3))
    trainer.train(run, records)
    assert len(norms) == 2  # one per optimizer step (2 micro-steps each)
    assert norms == pytest.approx([1e-3, 1e-3], rel=1e-3)


def test_checkpoint_limit_keeps_the_newest_up_to_the_current_step(tmp_path):
    """The newest ``limit`` checkpoints survive; checkpoints past the current step (a longer run with the same
    settings) are left alone, so a shorter rerun does not delete what it has just saved."""
    net = torch.nn.Linear(2, 2)

    class Saveable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def save_pretrained(self, folder, safe_serialization=True):
            Path(folder).mkdir(parents=True)

    model, opt = Saveable(), torch.optim.AdamW(net.parameters())

    def steps() -> list[int]:
        return [s for s, _ in checkpoints.list_checkpoints(tmp_path)]

    for step in (10, 20, 30, 40):
        checkpoints.save_checkpoint(tmp_path, step, model, opt, {"step": step}, limit=2)
    assert steps() == [30, 40]
    for step in (1, 2, 3):  # a shorter run
        checkpoints.save_checkpoint(tmp_path, step, model, opt, {"step": step}, limit=2)
    assert steps() == [2, 3, 30, 40]
    checkpoints.save_checkpoint(tmp_path, 50, model, opt, {"step": 50}, limit=0)
    assert steps() == [2, 3, 30, 40, 50]  # limit 0 keeps every checkpoint


def kill_after_first_checkpoint(run: TrainRun, records, monkeypatch) -> None:
    """Train ``run`` and kill it (KeyboardInterrupt) right after its first checkpoint is written."""
    real_save = trainer.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed after the first checkpoint")

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            trainer.train(run, records)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_resume_after_kill_equals_uninterrupted_run(data_dirs, tiny_sd, tmp_path, monkeypatch, schedule):
    records, _ = load_records(*data_dirs, RES)

    def run(folder: str) -> TrainRun:
        plain = make_run(tmp_path / folder, tiny_sd, max_steps=6)
        return replace(plain, optim=replace(plain.optim, lr_schedule=schedule, warmup_steps=3))

    straight = trainer.train(run("a"), records)
    kill_after_first_checkpoint(run("b"), records, monkeypatch)
    assert not (tmp_path / "b" / "unet").exists()
    resumed = trainer.train(run("b"), records)
    assert resumed.this_run["resumed_from_step"] == 2
    if schedule == "linear":  # the rate each step used; the resumed schedule continues where it stopped
        assert [row["lr"] for row in resumed.curves] == pytest.approx([1e-4 * f for f in (0, 1/3, 2/3, 1, 2/3, 1/3)])
    assert resumed.curves == straight.curves
    assert resumed.metrics == straight.metrics  # what DVC records does not depend on the run's history
    for row in straight.curves:  # the optimised loss is the weighted sum of the logged terms (SPEC §1.5)
        assert row["loss"] == pytest.approx(row["denoise"] + 1e-3 * row["token"] + 5e-5 * row["pixel"], rel=1e-6)
    from diffusers import UNet2DConditionModel

    a = UNet2DConditionModel.from_pretrained(tmp_path / "a" / "unet")
    b = UNet2DConditionModel.from_pretrained(tmp_path / "b" / "unet")
    assert state_dict_hash(a) == state_dict_hash(b)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_other_settings_keep_checkpoints_and_switching_back_resumes(data_dirs, tiny_sd, tmp_path):
    """Each run writes under its own key: a run with other loss weights starts from scratch and leaves the
    first run's checkpoints (and any other folder) byte for byte; going back to the first settings resumes
    from their latest checkpoint. Each key's run.json tells the runs apart."""
    from datetime import datetime

    from pipeline.store.identity import fingerprint_of

    records, _ = load_records(*data_dirs, RES)
    root = tmp_path / "checkpoints"
    foreign = {root / "0123456789abcdef" / "checkpoint-7", root / "checkpoint-3"}  # another key, the old layout
    for folder in foreign:
        folder.mkdir(parents=True)
        (folder / "state.json").write_text('{"step": 7, "fingerprint": "other-run"}')
    first = trainer.train(make_run(tmp_path, tiny_sd, max_steps=2), records)
    key_a = run_key(tmp_path, first)
    kept = snapshot(key_a)
    assert [p.name for _, p in checkpoints.list_checkpoints(key_a)] == ["checkpoint-2"]
    created = checkpoints.read_run_info(key_a)["created"]
    other = replace(make_run(tmp_path, tiny_sd, max_steps=2), loss=LossCfg(1e-2, 5e-5, LAYERS))
    second = trainer.train(other, records)
    key_b = run_key(tmp_path, second)
    assert second.this_run["resumed_from_step"] == 0 and key_b != key_a
    state = json.loads((key_b / "checkpoint-2" / "state.json").read_text())
    assert state["fingerprint"] == second.metrics["fingerprint"]
    assert snapshot(key_a) == kept
    back = trainer.train(make_run(tmp_path, tiny_sd, max_steps=4), records)
    assert back.this_run["resumed_from_step"] == 2 and back.metrics["fingerprint"] == first.metrics["fingerprint"]
    assert back.curves[:2] == first.curves and [r["step"] for r in back.curves] == [1, 2, 3, 4]
    assert [s for s, _ in checkpoints.list_checkpoints(key_a)] == [2, 4]
    assert [s for s, _ in checkpoints.list_checkpoints(key_b)] == [2]
    assert all((folder / "state.json").is_file() for folder in foreign)
    runs = dict(checkpoints.list_runs(root))
    assert set(runs) == {key_a, key_b, root / "0123456789abcdef"} and runs[root / "0123456789abcdef"] is None
    info_a, info_b = runs[key_a], runs[key_b]
    for key, info in ((key_a, info_a), (key_b, info_b)):  # run.json holds exactly what the key hashes
        assert info["fingerprint"] == key.name == fingerprint_of(info["params"])
        assert datetime.fromisoformat(info["created"]) <= datetime.fromisoformat(info["updated"])
    assert info_a["params"]["loss"]["token_weight"] == 1e-3 and info_b["params"]["loss"]["token_weight"] == 1e-2
    assert (info_a["last_saved_step"], info_a["max_steps"], info_a["world_size"]) == (4, 4, 1)
    assert info_b["last_saved_step"] == 2 and info_a["created"] == created


def test_checkpoints_of_other_code_are_not_resumed(data_dirs, tiny_sd, tmp_path, monkeypatch):
    records, _ = load_records(*data_dirs, RES)
    first = trainer.train(make_run(tmp_path, tiny_sd, max_steps=2), records)
    kept = snapshot(run_key(tmp_path, first))
    monkeypatch.setattr(trainer, "code_digest", lambda *_: "edited-code")
    again = trainer.train(make_run(tmp_path, tiny_sd, max_steps=2), records)
    assert again.this_run["resumed_from_step"] == 0 and again.metrics["fingerprint"] != first.metrics["fingerprint"]
    assert snapshot(run_key(tmp_path, first)) == kept  # the other code's checkpoints stay
    assert [s for s, _ in checkpoints.list_checkpoints(run_key(tmp_path, again))] == [2]


def test_run_key_counts_the_trainer_code_by_its_syntax(tmp_path, monkeypatch):
    """On a copy of the package: a comment or docstring edit in a module the trainer imports (or in the
    trainer) keeps the run key, so a rerun resumes; a code edit there changes it; code edits in every module
    the trainer does not import (how records are loaded, the curves file, the other stages) keep it."""
    import shutil

    from pipeline.store import identity

    run = make_run(tmp_path, Path("tiny-sd"))
    key = trainer.run_fingerprint(run, "data")
    assert trainer.run_fingerprint(run, "other data") != key
    assert trainer.run_fingerprint(replace(run, seed=1), "data") != key
    copy = tmp_path / "pipeline"
    shutil.copytree(identity.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(identity, "PACKAGE_DIR", copy)
    assert trainer.run_fingerprint(run, "data") == key  # a faithful copy
    closure = {p.relative_to(copy).as_posix() for p in identity.import_closure("pipeline.training.trainer")}
    assert {"training/trainer.py", "training/step.py", "training/losses.py", "training/data.py",
            "training/checkpoints.py", "attention.py", "geometry.py"} <= closure
    assert not closure & {"training/sources.py", "training/curves.py", "report.py"}
    for name in ("training/trainer.py", "training/losses.py", "training/data.py", "attention.py", "geometry.py"):
        path = copy / name
        original = path.read_text()
        assert original.startswith('"""')
        cosmetic = '"""Reworded. ' + original[3:].replace("\n\n\n", "\n\n\n# a comment\n", 1) + "\n# the end\n"
        path.write_text(cosmetic)
        assert trainer.run_fingerprint(run, "data") == key, name
        path.write_text(original + "\nEDITED = 1\n")
        assert trainer.run_fingerprint(run, "data") != key, name
        path.write_text(original)
    outside = [p for p in copy.rglob("*.py") if p.relative_to(copy).as_posix() not in closure]
    assert {copy / "training" / "sources.py", copy / "training" / "curves.py"} <= set(outside)
    for path in outside:
        path.write_text(path.read_text() + "\nEDITED = 1\n")
    assert trainer.run_fingerprint(run, "data") == key


def test_non_finite_loss_stops_naming_step_and_images(data_dirs, tiny_sd, tmp_path, monkeypatch):
    records, _ = load_records(*data_dirs, RES)
    real = training_step.grounding_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.token = out.token * float("nan")
        return out

    monkeypatch.setattr(training_step, "grounding_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"optimizer step 1 .*images \['demo"):
        trainer.train(make_run(tmp_path, tiny_sd, max_steps=1), records)


def test_denoise_only_training_without_masks(data_dirs, tiny_sd, tmp_path):
    """No masks at all, or zero loss weights: the denoising loss alone, no capture."""
    images, _ = data_dirs
    records, stats = load_records(images, None, RES)
    assert stats["images_grounded"] == 0
    run = replace(make_run(tmp_path, tiny_sd, max_steps=1, grad_accum=1), loss=LossCfg(0.0, 0.0, LAYERS))
    result = trainer.train(run, records)
    assert "token" not in result.curves[0] and np.isfinite(result.curves[0]["denoise"])
    with pytest.raises(ValueError, match="no training images"):
        load_records(images, None, RES, skip_ungrounded=True)


def test_ema_with_checkpointing_saves_the_average_and_resumes_exactly(data_dirs, tiny_sd, tmp_path, monkeypatch):
    """With EMA on: the saved UNet is the EMA shadow (not the raw weights of the last checkpoint), and a run
    killed after its first checkpoint resumes EMA state to the same final UNet and curves."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    records, _ = load_records(*data_dirs, RES)

    def run_in(out):
        run = make_run(out, tiny_sd, max_steps=4, gradient_checkpointing=True)
        return replace(run, train=TrainCfg(use_ema=True, ema_decay=0.5, checkpoint_limit=2))

    straight = trainer.train(run_in(tmp_path / "a"), records)
    assert straight.metrics["ema"] and np.isfinite(straight.curves[-1]["token"])
    kill_after_first_checkpoint(run_in(tmp_path / "b"), records, monkeypatch)
    resumed = trainer.train(run_in(tmp_path / "b"), records)
    assert resumed.this_run["resumed_from_step"] == 2 and resumed.curves == straight.curves
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "a" / "unet")
    assert state_dict_hash(saved) == state_dict_hash(UNet2DConditionModel.from_pretrained(tmp_path / "b" / "unet"))
    last = run_key(tmp_path / "a", straight) / "checkpoint-4"
    shadow = torch.load(last / "ema.pt", weights_only=True)["shadow_params"]
    for param, average in zip(saved.parameters(), shadow):
        torch.testing.assert_close(param, average, rtol=0, atol=0)
    raw = load_file(last / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(raw[k], v) for k, v in saved.state_dict().items())


def test_object_mask_records_crop_the_true_masks(data_dirs, clip_tokenizer):
    """At resolution == shorter side there is no resize: the train mask is the centre crop of the mask."""
    images, _ = data_dirs
    records, unaligned = object_mask_records(images, clip_tokenizer, RES, "train")
    rows = {r["image_id"]: r for r in iter_rows(images)}
    assert unaligned == 0 and records
    for record in records:
        objects = {o["name"]: rle_decode(o["mask"]) for o in rows[record.image_id]["objects"]}
        ids = clip_tokenizer(record.caption).input_ids
        for word in record.words:
            full = objects[word.phrase]
            h, w = full.shape
            top, left = (h - RES) // 2, (w - RES) // 2
            np.testing.assert_array_equal(rle_decode(word.train_mask), full[top : top + RES, left : left + RES])
            decoded = "".join(clip_tokenizer.decode([ids[i]]).strip() for i in word.token_indices)
            assert decoded == word.phrase.replace(" ", "")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision needs a GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_gpu(data_dirs, tiny_sd, tmp_path, precision):
    """bf16/fp16 autocast with checkpointing: finite losses, grounding terms present, a resumable checkpoint."""
    records, _ = load_records(*data_dirs, RES)
    run = make_run(tmp_path / "a", tiny_sd, max_steps=4, checkpoint_every=2, mixed_precision=precision,
                   gradient_checkpointing=True)
    result = trainer.train(run, records)
    assert result.metrics["mixed_precision"] == precision
    assert all(np.isfinite(r["token"]) and np.isfinite(r["pixel"]) for r in result.curves)
    last = run_key(tmp_path / "a", result) / "checkpoint-4"
    assert (last / ("scaler.pt" if precision == "fp16" else "unet")).exists()
    first_half = trainer.train(replace(run, out_dir=tmp_path / "b", scale=replace(run.scale, max_steps=2)), records)
    assert first_half.metrics["steps"] == 2
    resumed = trainer.train(replace(run, out_dir=tmp_path / "b"), records)
    assert resumed.this_run["resumed_from_step"] == 2
    for a, b in zip(result.curves, resumed.curves):  # GPU kernels may round differently between runs
        assert b["step"] == a["step"] and b["loss"] == pytest.approx(a["loss"], rel=1e-2)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_equals_eager_training(data_dirs, tiny_sd, tmp_path, monkeypatch, checkpointing):
    """``compile: true``: same losses, same trained weights up to float rounding, same checkpoint fingerprint
    (a compiled run resumes an eager one). Without checkpointing the whole UNet, capture processors
    included, is one graph; checkpointed blocks, whose stored maps are side effects, run eagerly."""
    from diffusers import UNet2DConditionModel

    from pipeline import models

    monkeypatch.setattr(models, "COMPILE_BACKEND", "aot_eager")  # dynamo + AOT autograd, no code generation
    records, _ = load_records(*data_dirs, RES)
    eager = trainer.train(make_run(tmp_path / "eager", tiny_sd, max_steps=2, gradient_checkpointing=checkpointing),
                           records)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = trainer.train(make_run(tmp_path / "compiled", tiny_sd, max_steps=2,
                                       gradient_checkpointing=checkpointing, compile=True), records)
    if not checkpointing:  # one graph for all 4 micro-steps: no graph break, no recompilation
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
    assert compiled.metrics["compiled"] and not eager.metrics["compiled"]
    assert compiled.metrics["fingerprint"] == eager.metrics["fingerprint"]
    for a, b in zip(eager.curves, compiled.curves):
        assert a.keys() == b.keys() and a["token"] > 0
        assert all(np.isclose(a[k], b[k], rtol=1e-4, atol=1e-7) for k in a), (a, b)
    ua = UNet2DConditionModel.from_pretrained(tmp_path / "eager" / "unet").state_dict()
    ub = UNet2DConditionModel.from_pretrained(tmp_path / "compiled" / "unet").state_dict()
    assert ua.keys() == ub.keys()
    assert max((ua[k] - ub[k]).abs().max().item() for k in ua) < 1e-5
    base = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").state_dict()
    assert max((base[k] - ub[k]).abs().max().item() for k in ua) > 1e-5  # training did move the weights


def test_two_processes_stay_in_sync_and_resume(data_dirs, tiny_sd, tmp_path):
    """Two CPU ranks under torchrun (accelerate DDP over gloo, the multi-GPU code path): both ranks end with
    the same weights and curves; a run stopped at step 2 and resumed to 4 equals a straight run of 4."""
    import os
    import subprocess
    import sys

    driver = Path(__file__).with_name("dist_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path, steps: int, processes: int = 2) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(driver), *map(str, data_dirs), str(tiny_sd), str(out), str(steps)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    def launch(out: Path, steps: int) -> list[dict]:
        proc = run(out, steps)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    root = tmp_path / "straight" / "checkpoints"  # another key's checkpoints and the old flat layout: kept
    stale = [root / "0123456789abcdef" / f"checkpoint-{step}" for step in range(1, 21)]
    stale += [root / f"checkpoint-{step}" for step in range(1, 21)]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "state.json").write_text('{"fingerprint": "other-run"}')
    straight = launch(tmp_path / "straight", 4)
    assert all((folder / "state.json").is_file() for folder in stale)
    key = root / straight[0]["metrics"]["fingerprint"]
    assert [s for s, _ in checkpoints.list_checkpoints(key)] == [2, 4]
    assert checkpoints.read_run_info(key)["world_size"] == 2
    launch(tmp_path / "resumed", 2)
    resumed = launch(tmp_path / "resumed", 4)
    for ranks in (straight, resumed):
        assert ranks[0]["unet"] == ranks[1]["unet"] and ranks[0]["curves"] == ranks[1]["curves"]
        assert ranks[0]["metrics"]["world_size"] == 2 and ranks[0]["metrics"]["effective_batch"] == 4
    assert straight[0]["this_run"]["samples_this_run"] == 16          # 4 steps x 2 micro-steps x 2 ranks
    assert resumed[0]["this_run"]["resumed_from_step"] == 2
    assert resumed[0]["unet"] == straight[0]["unet"] and resumed[0]["curves"] == straight[0]["curves"]
    from diffusers import UNet2DConditionModel

    saved = UNet2DConditionModel.from_pretrained(tmp_path / "straight" / "unet")
    assert state_dict_hash(saved) == straight[0]["unet"]
    # One process cannot continue a two-process run (other data order and effective batch): refused, kept.
    alone = run(tmp_path / "resumed", 6, processes=1)
    assert alone.returncode != 0 and "was made by 2 processes and this run has 1" in alone.stderr
    assert (tmp_path / "resumed" / "checkpoints" / resumed[0]["metrics"]["fingerprint"] / "checkpoint-4"
            / "state.json").is_file()


def test_latent_cache_encodes_each_image_once_and_changes_nothing(data_dirs, tiny_sd, tmp_path, monkeypatch):
    """With ``cache_latents`` every image goes through the VAE encoder once; losses and weights equal the
    run that encodes at every step (up to float rounding of batched kernels)."""
    from diffusers import UNet2DConditionModel

    records, _ = load_records(*data_dirs, RES)
    encoded: list[int] = []
    real = training_step.LatentCache.posterior

    def counting(self, vae, pixel_values, image_ids):
        before = self.encoded
        out = real(self, vae, pixel_values, image_ids)
        encoded.append(self.encoded - before)
        return out

    monkeypatch.setattr(training_step.LatentCache, "posterior", counting)
    steps = 6  # 24 samples over 9 training images: every image comes back
    plain = trainer.train(make_run(tmp_path / "plain", tiny_sd, max_steps=steps, cache_latents=False), records)
    cached = trainer.train(make_run(tmp_path / "cached", tiny_sd, max_steps=steps, cache_latents=True), records)
    assert sum(encoded) == cached.this_run["vae_encodes_rank0"] == len(records) == 9
    assert plain.this_run["vae_encodes_rank0"] == 24 and len(encoded) == 12  # one call per micro-step
    assert cached.metrics["fingerprint"] == plain.metrics["fingerprint"]
    for a, b in zip(plain.curves, cached.curves):
        assert all(np.isclose(a[k], b[k], rtol=1e-5, atol=1e-8) for k in a), (a, b)
    ua = UNet2DConditionModel.from_pretrained(tmp_path / "plain" / "unet").state_dict()
    ub = UNet2DConditionModel.from_pretrained(tmp_path / "cached" / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").state_dict()
    moved = max((ua[k] - base[k]).abs().max().item() for k in ua)             # ~ steps x lr (Adam)
    assert max((ua[k] - ub[k]).abs().max().item() for k in ua) < 0.01 * moved  # rounding, amplified by Adam


def test_grounding_losses_without_any_mask_are_refused():
    """Weights > 0 and no image with an aligned mask would silently be plain fine-tuning."""
    from pipeline.training.sources import check_grounded

    loss = LossCfg(token_weight=1e-3, pixel_weight=5e-5, layers=["mid_8"])
    with pytest.raises(ValueError, match="no training image has an aligned mask"):
        check_grounded({"images_grounded": 0}, loss)
    check_grounded({"images_grounded": 3}, loss)
    check_grounded({"images_grounded": 0}, LossCfg(token_weight=0.0, pixel_weight=0.0, layers=[]))
