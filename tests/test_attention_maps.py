"""Attention-map aggregation, the grounding share, figures, and per-step capture on the tiny model."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import figures
from pipeline.attention_maps import figures as am_figures
from pipeline.attention_maps import grounding_eval as am_grounding
from pipeline.attention_maps import recording


def test_group_map_averages_layers_and_heads_and_keeps_conditional_half():
    gen = torch.Generator().manual_seed(0)
    # 2 layers, CFG batch of 2 images (uncond 0..1, cond 2..3), 3 heads, 2x2 queries, 5 tokens.
    layers = [torch.rand(4, 3, 4, 5, generator=gen).softmax(-1) for _ in range(2)]
    out = recording.group_map(layers, num_images=2)
    arr = np.stack([m.numpy() for m in layers])  # (L, B, heads, P, T)
    expected = np.zeros((2, 4, 5))
    for b in range(2):
        for layer in range(2):
            for head in range(3):
                expected[b] += arr[layer, 2 + b, head] / 6.0
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(recording.group_map(layers).numpy(), arr.mean(axis=(0, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="neither 3 images nor 6"):
        recording.group_map(layers, num_images=3)
    with pytest.raises(ValueError, match="no attention maps captured"):
        recording.group_map([])


def test_token_maps_sum_subtokens_in_row_major_layout():
    group = torch.zeros(1, 6, 4)  # 2x3 is not square -> error; use 2x2 below
    with pytest.raises(ValueError, match="do not form a square"):
        recording.token_maps(group, [[1]])
    group = torch.arange(1 * 4 * 5, dtype=torch.float32).reshape(1, 4, 5)  # value = 5*query + token
    maps = recording.token_maps(group, [[2], [1, 3]])
    assert maps.shape == (1, 2, 2, 2)
    # query q sits at (q // 2, q % 2), as diffusers flattens (H, W)
    np.testing.assert_array_equal(maps[0, 0].numpy(), [[2, 7], [12, 17]])
    np.testing.assert_array_equal(maps[0, 1].numpy(), [[4, 14], [24, 34]])
    with pytest.raises(ValueError, match="outside 0..4"):
        recording.token_maps(group, [[5]])


def test_grounding_share_reproduces_spec_worked_example():
    # SPEC §1.7: heads [[.2,.1],[.05,.05]] and [[.1,.1],[.1,.1]], mask top-left cell; both heads carry 0.4, so
    # the head-averaged map's share equals the mean of per-head ratios, 0.375 = 1 - sqrt(0.390625).
    heads = torch.tensor([[[0.20, 0.10], [0.05, 0.05]], [[0.10, 0.10], [0.10, 0.10]]])
    avg = heads.mean(0, keepdim=True)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :4] = True  # exactly the top-left attention cell at image size 8
    share = am_grounding.grounding_share(avg, mask)
    assert share.shape == (1,)
    assert math.isclose(float(share), 0.375, rel_tol=1e-6)
    assert math.isclose((1 - float(share)) ** 2, 0.390625, rel_tol=1e-6)


def test_grounding_share_matches_pixel_level_computation():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 4, 4)).astype(np.float32)
    masks = rng.random((3, 32, 32)) > 0.7
    masks[2] = False  # an empty mask: share 0
    got = am_grounding.grounding_share(torch.from_numpy(maps), torch.from_numpy(masks)).numpy()
    for k in range(3):
        spread = np.kron(maps[k], np.ones((8, 8))) / 64.0  # each cell's mass spread over its 8x8 pixels
        np.testing.assert_allclose(got[k], (spread * masks[k]).sum() / spread.sum(), rtol=1e-5)
    assert got[2] == 0.0
    assert math.isnan(float(am_grounding.grounding_share(torch.zeros(1, 2, 2), torch.ones(1, 4, 4, dtype=torch.bool))[0]))
    with pytest.raises(ValueError, match="expected \\(K, h, w\\) maps"):
        am_grounding.grounding_share(torch.zeros(2, 2, 2), torch.ones(1, 4, 4))


def test_upsample_and_display_scale():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]]])
    up = recording.upsample(maps, 8)
    assert up.shape == (1, 2, 8, 8)
    assert float(up[0, 0].min()) >= 0.0 and float(up[0, 0].max()) <= 3.0
    assert torch.allclose(up[0, 1], torch.full((8, 8), 5.0))
    # One fixed scale (attention / its image mean, 1 = uniform, top = 4): a uniform map is flat at 1/4 ...
    shown = am_figures.relative_to_mean(up)
    assert torch.allclose(shown[0, 1], torch.full((8, 8), 0.25))
    # ... and so is a near-uniform one: rounding noise is not stretched into hot spots (min-max scaling did)
    noisy = torch.full((1, 1, 4, 4), 0.01) + 1e-6 * torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert float(am_figures.relative_to_mean(noisy).max() - am_figures.relative_to_mean(noisy).min()) < 1e-3
    focused = torch.zeros(1, 1, 4, 4)
    focused[..., :2, :2] = 0.3  # all attention on a quarter of the image: 4x its mean there, 0 elsewhere
    assert torch.equal(am_figures.relative_to_mean(focused), (focused > 0).float())
    assert float(am_figures.relative_to_mean(torch.zeros(1, 1, 2, 2)).abs().max()) == 0.0  # no division by zero


def test_attention_grid_layout():
    image = np.full((32, 32, 3), 128, np.uint8)
    maps = np.random.default_rng(0).random((2, 3, 4, 32, 32))
    png = figures.attention_grid(image, maps, ["up_16", "up_64"], ["s0", "s1", "s2"], list("abcd"), "title")
    figure = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert figure.shape[1] > 7 * 32 and figure.shape[0] > 4 * 32  # 4 token rows by 7 cells (image + 2 x 3)
    with_bar = figures.attention_grid(image, maps, ["up_16", "up_64"], ["s0", "s1", "s2"], list("abcd"), "title",
                                      colour_scale=(am_figures.DISPLAY_TOP, am_figures.SCALE_LABEL))
    barred = np.asarray(Image.open(io.BytesIO(with_bar)).convert("RGB"))
    assert barred.shape[0] > figure.shape[0] + 30  # a colour bar with its label under the grid
    # cells: constant maps, value 0.1*(g*12 + s*4 + k) -> the cell of row k, column 1 + 3g + s shows it
    const = np.array([[[np.full((8, 8), 0.1 * (g * 12 + s * 4 + k) / 2.4) for k in range(4)] for s in range(3)]
                      for g in range(2)])
    small = np.full((8, 8, 3), 200, np.uint8)
    mosaic = figures.attention_mosaic(small, const, alpha=0.6, gap=2)
    assert mosaic.shape == (4 * 10 - 2, 7 * 10 - 2, 3)
    np.testing.assert_allclose(mosaic[:8, :8], 200 / 255)
    assert (mosaic[10:, :8] == 1.0).all()  # only the first row shows the image
    grey = np.full((8, 8), 200 / 255)
    for g in range(2):
        for s in range(3):
            for k in range(4):
                y, x = k * 10, (1 + 3 * g + s) * 10
                np.testing.assert_allclose(mosaic[y:y + 8, x:x + 8], figures.overlay(grey, const[g, s, k], 0.6))
    with pytest.raises(ValueError, match="do not match"):
        figures.attention_grid(image, maps, ["up_16"], ["s0", "s1", "s2"], list("abcd"))
    with pytest.raises(ValueError, match="same size"):
        figures.attention_grid(image[:16], maps, ["up_16", "up_64"], ["s0", "s1", "s2"], list("abcd"))


def test_overlay_blends_colour_map_and_grey():
    grey = np.full((2, 2), 0.5)
    heat = np.array([[0.0, 1.0], [0.5, 2.0]])
    out = figures.overlay(grey, heat, alpha=0.6)
    import matplotlib

    jet = matplotlib.colormaps["jet"]
    np.testing.assert_allclose(out[0, 1], 0.6 * np.array(jet(1.0)[:3]) + 0.2)
    np.testing.assert_allclose(out[1, 1], out[0, 1])  # clipped to 1
    np.testing.assert_allclose(figures.overlay(grey, heat, alpha=0.0), np.full((2, 2, 3), 0.5))


def test_step_recorder_on_tiny_pipeline(tiny_sd, models_dir, monkeypatch):
    from pipeline.attention import capturing
    from pipeline.models import load_sd_pipeline

    layers_per_step: dict[int, list[int]] = {}  # positions (H*W) of a group -> maps it averaged at each step
    real_group_map = recording.group_map

    def counting_group_map(layers, num_images):
        layers_per_step.setdefault(int(layers[0].shape[2]), []).append(len(layers))
        return real_group_map(layers, num_images)

    monkeypatch.setattr(recording, "group_map", counting_group_map)

    pipe = load_sd_pipeline(str(tiny_sd), models_dir)
    steps = 4
    pipe.scheduler.set_timesteps(steps)
    num_timesteps = len(pipe.scheduler.timesteps)  # PNDM (skip_prk_steps) runs one extra evaluation
    keep = recording.resolve_steps([0, -1], num_timesteps)
    assert keep == [0, num_timesteps - 1]
    with capturing(pipe.unet, ["mid_8", "up_64"], detach=True) as store:
        recorder = recording.StepRecorder(store, num_images=2, keep_steps=range(num_timesteps))
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        pipe(["a cat and a dog"] * 2, num_inference_steps=steps, generator=gens, guidance_scale=7.5,
             callback_on_step_end=recorder, output_type="np")
    assert recorder.num_steps == num_timesteps == len(recorder.steps)
    # each step averages only its own maps: one per layer of the group (the store is emptied between steps)
    assert {hw: set(counts) for hw, counts in layers_per_step.items()} == {4: {1}, 256: {3}}
    assert all(len(counts) == num_timesteps for counts in layers_per_step.values())
    up = recorder.steps[0]["up_64"]
    assert up.shape == (2, 16 * 16, 77) and store.resolution("up_64") == 16
    assert recorder.steps[0]["mid_8"].shape == (2, 2 * 2, 77)
    torch.testing.assert_close(up.sum(-1), torch.ones(2, 256))  # softmax over the 77 keys
    mean = torch.stack([recorder.steps[s]["up_64"] for s in range(num_timesteps)]).mean(0)
    torch.testing.assert_close(recorder.mean["up_64"], mean)
    assert not torch.equal(recorder.steps[0]["up_64"], recorder.steps[num_timesteps - 1]["up_64"])
    with pytest.raises(ValueError, match="outside 0..4"):
        recording.resolve_steps([7], 5)


def _tiny_sampler(tiny_sd, models_dir, batch_size: int, pipe=None):
    from pipeline.models import load_sd_pipeline
    from pipeline.sampling.sampler import Sampler
    from pipeline.sampling.settings import SamplingCfg, SamplingScale

    pipe = pipe or load_sd_pipeline(str(tiny_sd), models_dir)
    scale = SamplingScale(num_inference_steps=3, images_per_prompt=2, batch_size=batch_size)
    return Sampler(pipe, "sd", SamplingCfg(), scale, seed=0)


def test_recording_pipe_serves_the_sampler_per_image(tiny_sd, models_dir):
    from pipeline.attention import capturing
    from pipeline.sampling.items import SampleItem
    from pipeline.store.codecs import image_from_bytes

    items = [SampleItem("coco", p, j, text, ()) for p, text in enumerate(["a cat", "a red cup"]) for j in range(2)]
    plain = _tiny_sampler(tiny_sd, models_dir, batch_size=4).rows(items)
    records = {}
    for batch_size in (3, 1):  # two calls (3 + 1 images), then four single-image calls
        sampler = _tiny_sampler(tiny_sd, models_dir, batch_size)
        with capturing(sampler.pipe.unet, ["up_32", "up_64"], detach=True) as store:
            recorder = recording.RecordingPipe(sampler.pipe, store, keep_steps=[0, -1])
            sampler.pipe = recorder
            rows = sampler.rows(items)
        assert [r["status"] for r in rows] == ["ok"] * 4 and len(recorder.records) == 4
        for row, ref in zip(rows, plain):  # capture changes the images by float rounding at most
            got, want = (np.asarray(image_from_bytes(r["image"]), int) for r in (row, ref))
            assert np.abs(got - want).max() <= 1
        records[batch_size] = recorder.records
    n = recorder.num_timesteps(3)
    for batched, alone in zip(records[3], records[1]):
        assert sorted(batched.steps) == [0, n - 1] and batched.mean["up_64"].shape == (256, 77)
        torch.testing.assert_close(batched.mean["up_64"], alone.mean["up_64"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.steps[0]["up_32"], alone.steps[0]["up_32"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(records[1][0].mean["up_64"], records[1][2].mean["up_64"])  # other prompt


class FlakyPipe:
    """A pipeline that raises on chosen calls (by call number) and otherwise runs the real one."""

    def __init__(self, pipe, failing_calls):
        self._pipe, self._failing, self.calls = pipe, set(failing_calls), 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self._failing:
            raise RuntimeError("CUDA out of memory")
        return self._pipe(*args, **kwargs)


def test_records_follow_rows_when_a_batch_fails(tiny_sd, models_dir):
    """The batch of four raises (call 1), the sampler retries image by image, and image 1 fails alone too
    (call 3): rows and records stay paired, image 1 has no record, and the others carry their own maps."""
    from pipeline.sampling.items import SampleItem
    from pipeline.sampling.sampler import STATUS_FAILED

    items = [SampleItem("coco", p, j, text, ()) for p, text in enumerate(["a cat", "a red cup"]) for j in range(2)]
    alone = _tiny_sampler(tiny_sd, models_dir, batch_size=1)
    _, expected = recording.sample_with_attention(alone, items, ["up_64"])
    sampler = _tiny_sampler(tiny_sd, models_dir, batch_size=4)
    sampler.pipe = FlakyPipe(sampler.pipe, failing_calls=[1, 3])
    rows, records = recording.sample_with_attention(sampler, items, ["up_64"])
    assert [r["status"] for r in rows] == ["ok", STATUS_FAILED, "ok", "ok"]
    assert records[1] is None and sampler.pipe.calls == 5
    for j in (0, 2, 3):
        torch.testing.assert_close(records[j].mean["up_64"], expected[j].mean["up_64"], atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="recorded attention for 2 images but sampled 3"):
        recording.pair_records(rows, records[2:])


def test_word_tokens_and_figure_maps(clip_tokenizer):
    positions, labels = am_figures.word_tokens(clip_tokenizer, "a photo of a surfboard, and a cat.")
    assert labels == ["a", "photo", "of", "a", "surf", "board", "and", "a", "cat"]
    assert positions == [1, 2, 3, 4, 5, 6, 8, 9, 10]  # 7 is the comma, 11 the period
    # One-hot maps: token t attends only to pixel t mod 16 of a 4x4 grid, step 0 and step 1 swapped.
    onehot = torch.zeros(16, 77)
    onehot[torch.arange(77) % 16, torch.arange(77)] = 1.0
    record = recording.ImageAttention({0: {"up_16": onehot}, 1: {"up_16": onehot.flip(0)}}, {0: 981, 1: 961},
                               {"up_16": onehot})
    maps = am_figures.figure_maps(record, ["up_16"], [1, 5], (4, 4))
    assert maps.shape == (1, 2, 2, 4, 4)
    for k, pos in enumerate([1, 5]):
        assert maps[0, 0, k].reshape(-1).argmax() == pos % 16 and maps[0, 0, k].max() == 1.0
        assert maps[0, 1, k].reshape(-1).argmax() == 15 - pos % 16  # the second kept step, not the first
    half = torch.zeros(2, 4, 4, dtype=torch.bool)
    half[:, :2] = True  # top half: pixels 0..7
    shares = am_grounding.image_shares(record, ["up_16"], [[5, 6], [9, 10]], half)
    # word 1 (tokens 5, 6 -> pixels 5, 6) lies inside; word 2 (tokens 9, 10 -> pixels 9, 10) outside
    assert shares["up_16"].tolist() == [1.0, 0.0]


def test_capture_keeps_the_conditional_half_of_guidance(tiny_sd, models_dir):
    """Under classifier-free guidance the recorder keeps the text-conditioned branch: step-0 maps (same
    noise) equal the maps of a run without guidance, where the UNet sees the conditional input only."""
    from pipeline.sampling.items import SampleItem

    items = [SampleItem("coco", 0, j, "a red cup and a cat", ()) for j in range(2)]
    maps = {}
    for guidance in (7.5, 1.0):
        sampler = _tiny_sampler(tiny_sd, models_dir, batch_size=2)
        sampler.cfg = dataclasses.replace(sampler.cfg, guidance_scale=guidance)
        _, records = recording.sample_with_attention(sampler, items, ["up_64"], keep_steps=[0])
        maps[guidance] = [r.steps[0]["up_64"] for r in records]
    for with_cfg, without in zip(maps[7.5], maps[1.0]):
        torch.testing.assert_close(with_cfg, without, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(maps[7.5][0], maps[7.5][1])  # two images, two noises


def test_bad_step_is_a_config_error_before_sampling(tiny_sd, models_dir):
    from pipeline.sampling.items import SampleItem

    sampler = _tiny_sampler(tiny_sd, models_dir, batch_size=1)
    sampler.pipe = FlakyPipe(sampler.pipe, failing_calls=[])
    with pytest.raises(ValueError, match=r"attention_maps.steps: denoising step 9 is outside"):
        recording.sample_with_attention(sampler, [SampleItem("coco", 0, 0, "a cat", ())], ["up_64"], keep_steps=[9])
    assert sampler.pipe.calls == 0


def test_category_tokens_match_spec_examples(clip_tokenizer):
    # SPEC §6.3: COCO prompt 0 and 1 token positions (SOT = 0); all sub-tokens of each name.
    prompt = "a photo of a book, a cup, a kite, a mouse, and a surfboard."
    objects = ["book", "cup", "kite", "mouse", "surfboard"]
    indices, status, _ = am_grounding.category_tokens(clip_tokenizer, prompt, objects)
    assert indices == [[5], [8], [11], [14], [18, 19]] and status == ["ok"] * 5
    prompt = "a photo of a wine glass, a skateboard, a refrigerator, a boat, and a vase."
    objects = ["wine glass", "skateboard", "refrigerator", "boat", "vase"]
    indices, _, _ = am_grounding.category_tokens(clip_tokenizer, prompt, objects)
    assert indices == [[5, 6], [9], [12], [15], [19]]
    indices, status, errors = am_grounding.category_tokens(clip_tokenizer, "a photo of a cat.", ["dog"])
    assert indices == [[]] and status == ["not_in_caption"] and "dog" in errors[0]


class _FullMaskGrounder:
    """Stands in for Grounded-SAM: the first phrase of each image gets the whole image, the rest nothing."""

    def run(self, jobs):
        from pipeline.store.codecs import rle_encode

        rows = []
        for job in jobs:
            item = job.item
            for k, phrase in enumerate(item["phrases"]):
                full = k == 0 and job.image is not None
                mask = np.ones((job.image.height, job.image.width), bool) if full else None
                rows.append(dict(image_id=item["image_id"], phrase=phrase, token_indices=item["token_indices"][k],
                                 mask=rle_encode(mask) if full else None, status="ok" if full else "no_detection",
                                 error="" if full else "no box"))
        return rows


def test_grounding_rows_and_summary(tiny_sd, models_dir):
    from pipeline.datasets.multigen_files import MultiGenPrompt
    from pipeline.sampling.items import prompt_items

    prompts = [MultiGenPrompt(0, "a photo of a cup, a kite, and a boat.", ("cup", "kite", "boat"))]
    items = prompt_items("coco", prompts, 2)
    sampler = _tiny_sampler(tiny_sd, models_dir, batch_size=2)
    rows, samples = am_grounding.grounding_rows(sampler, _FullMaskGrounder(), items, ["mid_8", "up_64"])
    assert [r["image_id"] for r in rows] == ["coco/0_0"] * 3 + ["coco/0_1"] * 3
    cup = [r for r in rows if r["phrase"] == "cup"]
    assert all(r["status"] == "ok" and r["share_up_64"] == pytest.approx(1.0) and r["mask_area"] == 1.0 for r in cup)
    assert all(math.isnan(r["share_mid_8"]) for r in rows if r["phrase"] != "cup")
    summary = am_grounding.summarize_grounding(rows, ["mid_8", "up_64"])
    assert summary["categories"] == 6 and summary["categories_scored"] == 2 and summary["status_no_detection"] == 4
    assert summary["share_mean"] == pytest.approx(1.0) and summary["mask_area_mean"] == 1.0
    assert len(samples) == 2 and all(s["status"] == "ok" for s in samples)


def test_summarize_grounding_known_answer():
    rows = [{"status": "ok", "mask_area": 0.25, "share_up_16": 0.5, "share_up_64": 0.7},
            {"status": "ok", "mask_area": 0.75, "share_up_16": 0.9, "share_up_64": 0.1},
            {"status": "no_detection", "mask_area": math.nan, "share_up_16": math.nan, "share_up_64": math.nan}]
    out = am_grounding.summarize_grounding(rows, ["up_16", "up_64"])
    assert out["share_up_16"] == pytest.approx(0.7) and out["share_up_64"] == pytest.approx(0.4)
    assert out["share_mean"] == pytest.approx(0.55) and out["mask_area_mean"] == pytest.approx(0.5)
    assert (out["categories"], out["categories_scored"], out["status_ok"], out["status_no_detection"]) == (3, 2, 2, 1)
    empty = am_grounding.summarize_grounding([], ["up_16"])
    assert empty["categories"] == 0 and math.isnan(empty["share_mean"])


def test_compare_with_samples(tmp_path):
    from pipeline.sampling.items import SampleItem
    from pipeline.store.codecs import png_bytes
    from pipeline.store.shards import write_shards

    img = np.zeros((4, 4, 3), np.uint8)
    other = img.copy()
    other[0, 0] = 7
    items = [SampleItem("coco", 0, j, "t", ()) for j in range(3)]
    stored = [{"prompt_id": 0, "image_index": j, "image": png_bytes(img), "status": "ok"} for j in range(2)]
    write_shards(tmp_path / "s", stored, lambda chunk: chunk, 2, {}, code="test")
    samples = [{"image": png_bytes(img), "status": "ok"}, {"image": png_bytes(other), "status": "ok"},
               {"image": png_bytes(img), "status": "ok"}]  # the third has no stored counterpart
    assert am_grounding.compare_with_samples(tmp_path / "s", samples, items) == {
        "images_compared": 2, "images_identical": 1, "max_pixel_diff": 7}
    assert am_grounding.compare_with_samples(tmp_path / "absent", samples, items)["images_compared"] == 0


def test_attention_is_recorded_with_the_plain_sampler_only():
    """Attend-and-Excite replaces the attention processors, so its maps would not be recorded."""
    from pathlib import Path

    from pipeline.config import ConfigError, load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    with pytest.raises(ConfigError, match="eval_models.attend_excite: attention is recorded with the plain SD"):
        recording.load_sampler(params, "attend_excite")
