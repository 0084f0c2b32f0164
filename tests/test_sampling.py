"""Seeded batched sampling, Attend-and-Excite token indices, resume (pipeline/sampling.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_params, section
from pipeline.datasets.multigen_files import MultiGenPrompt, load_prompt_set
from pipeline.eval_models import EvalModel, EvalModelRef
from pipeline.models import component_hashes
from pipeline.sampling.attend_excite import TokenIndexError, ae_token_indices, head_word
from pipeline.sampling.items import image_generator, prompt_items
from pipeline.sampling.sampler import STATUS_NAN, STATUS_TOKENS_FAILED, Sampler, load_pipeline, sample_prompt_set
from pipeline.sampling.settings import AttendExciteCfg, SamplingCfg, SamplingScale
from pipeline.seeding import standard_normal
from pipeline.store.codecs import image_from_bytes
from pipeline.store.shards import STATUS_OK, read_shards, shard_path

REPO = Path(__file__).resolve().parents[1]
COCO, ADE = "coco_obj_comp_5_1k.json", "ade20k_obj_comp_5_1k.json"
SCALE = SamplingScale(num_inference_steps=2, images_per_prompt=3, batch_size=3, resolution=None,
                      dtype="float32", shard_size=3)


# --- token indices (SPEC §6.3) --------------------------------------------------------------------------

def test_head_word_rule():
    assert head_word("surfboard") == (0, "surfboard")
    assert head_word("wine glass") == (1, "glass")
    assert head_word("chest of drawers") == (0, "chest")


def test_token_indices_of_first_official_coco_prompts(shared_data, clip_tokenizer):
    prompts = load_prompt_set(shared_data / "multigen" / COCO, max_prompts=2)
    got = [ae_token_indices(clip_tokenizer, p.text, p.objects) for p in prompts]
    assert got == [[5, 8, 11, 14, 18, 19], [6, 9, 12, 15, 19]]
    alt = [ae_token_indices(clip_tokenizer, p.text, p.objects, rule="last_piece") for p in prompts]
    assert alt == [[5, 8, 11, 14, 19], [6, 9, 12, 15, 19]]


@pytest.mark.parametrize("name, low, high", [(COCO, 5, 7), (ADE, 5, 8)])
def test_token_indices_resolve_for_all_official_prompts(shared_data, clip_tokenizer, name, low, high):
    prompts = load_prompt_set(shared_data / "multigen" / name)
    assert len(prompts) == 1000
    counts = []
    for p in prompts:
        idx = ae_token_indices(clip_tokenizer, p.text, p.objects)
        ids = clip_tokenizer(p.text).input_ids
        assert idx == sorted(set(idx)) and max(idx) < len(ids) - 1 <= 76
        heads = {head_word(o)[1] for o in p.objects}
        assert {clip_tokenizer.decode([ids[i]]).strip() for i in idx} <= {
            clip_tokenizer.decode(clip_tokenizer(h, add_special_tokens=False).input_ids[k : k + 1]).strip()
            for h in heads for k in range(4)}
        counts.append(len(idx))
        assert len(ae_token_indices(clip_tokenizer, p.text, p.objects, rule="last_piece")) == 5
    assert (min(counts), max(counts)) == (low, high)


def test_chest_of_drawers_excites_only_chest(clip_tokenizer):
    text = "a photo of a bed, a lamp, a sofa, a chest of drawers, and a ottoman."
    objects = ("bed", "lamp", "sofa", "chest of drawers", "ottoman")
    idx = ae_token_indices(clip_tokenizer, text, objects)
    ids = clip_tokenizer(text).input_ids
    assert [clip_tokenizer.decode([ids[i]]) for i in idx] == ["bed", "lamp", "sofa", "chest", "ottoman"]


def test_token_indices_resolve_for_every_sr2d_prompt(clip_tokenizer):
    """All 25,280 VISOR spatial prompts, "an" included: one index per head-word piece, in prompt order."""
    from pipeline.datasets.categories import load_categories
    from pipeline.visor import spatial_prompts

    for p in spatial_prompts(load_categories("coco")):
        idx = ae_token_indices(clip_tokenizer, p.text, p.objects)
        ids = clip_tokenizer(p.text).input_ids
        want = [clip_tokenizer(head_word(o)[1], add_special_tokens=False).input_ids for o in p.objects]
        assert [ids[i] for i in idx] == want[0] + want[1], p.text
        relation = clip_tokenizer(p.relation, add_special_tokens=False).input_ids
        after = next(i for i in range(len(ids)) if ids[i : i + len(relation)] == relation) + len(relation)
        assert idx == sorted(set(idx)) and idx[len(want[0]) - 1] < after <= idx[len(want[0])], p.text
    text = "an elephant to the right of a tv"
    ids = clip_tokenizer(text).input_ids
    idx = ae_token_indices(clip_tokenizer, text, ("elephant", "tv"))
    assert [clip_tokenizer.decode([ids[i]]) for i in idx] == ["elephant", "tv"] and idx == [2, 8]
    assert ae_token_indices(clip_tokenizer, "a teddy bear below a bear", ("teddy bear", "bear")) == [3, 6]


def test_token_indices_reject_an_object_missing_from_the_prompt(clip_tokenizer):
    with pytest.raises(TokenIndexError, match="'kite'"):
        ae_token_indices(clip_tokenizer, "a photo of a book, and a cup.", ("book", "kite"))


# --- seeded batched sampling -----------------------------------------------------------------------------

PROMPTS = [MultiGenPrompt(0, "a photo of a book, a cup, a kite, a mouse, and a surfboard.",
                          ("book", "cup", "kite", "mouse", "surfboard")),
           MultiGenPrompt(1, "a photo of a wine glass, a skateboard, a refrigerator, a boat, and a vase.",
                          ("wine glass", "skateboard", "refrigerator", "boat", "vase"))]


@pytest.fixture(scope="module")
def models(embedded) -> Path:
    embedded("tiny-sd")
    embedded("tiny-sd-unet-a")
    return embedded("tiny-sd").parent


def make_sampler(models, kind="sd", unet=None, scale=SCALE, cfg=SamplingCfg()) -> Sampler:
    pipe = load_pipeline(EvalModelRef("embedded:tiny-sd", unet), kind, models, cfg, torch.float32,
                         torch.device("cpu"))
    return Sampler(pipe, kind, cfg, scale, seed=0)


@pytest.fixture(scope="module")
def sd(models) -> Sampler:
    """The plain tiny SD sampler (batch 3); tests vary ``scale`` with ``dataclasses.replace``."""
    return make_sampler(models)


@pytest.fixture(scope="module")
def ae(models) -> Sampler:
    """Attend-and-Excite on the tiny SD."""
    return make_sampler(models, "attend_excite")


def pixels(row) -> np.ndarray:
    return np.asarray(image_from_bytes(row["image"]), dtype=np.int16)


def test_initial_latents_do_not_depend_on_the_batch():
    items = prompt_items("coco", PROMPTS, 3)
    batch = standard_normal([image_generator(0, it) for it in items], (4, 16, 16))
    alone = standard_normal([image_generator(0, items[4])], (4, 16, 16))
    assert torch.equal(batch[4], alone[0])
    assert not torch.equal(batch[3], batch[4])
    other_seed = standard_normal([image_generator(1, items[4])], (4, 16, 16))
    assert not torch.equal(other_seed[0], alone[0])


def test_image_is_the_same_alone_and_in_a_batch(sd):
    """Same noise in any batch; pixels agree up to float rounding of batched kernels (<= 1/255)."""
    items = prompt_items("coco", PROMPTS, 3)
    batched = sd.rows(items)                            # batches (0,0 0,1 0,2) (1,0 1,1 1,2)
    alone = dataclasses.replace(sd, scale=dataclasses.replace(SCALE, batch_size=1)).rows([items[4]])
    mixed = dataclasses.replace(sd, scale=dataclasses.replace(SCALE, batch_size=2)).rows([items[2], items[4]])
    assert [r["status"] for r in batched] == [STATUS_OK] * 6
    ref = pixels(batched[4])
    assert np.abs(pixels(alone[0]) - ref).max() <= 1
    assert np.abs(pixels(mixed[1]) - ref).max() <= 1
    assert np.abs(pixels(mixed[0]) - pixels(batched[2])).max() <= 1
    assert np.abs(pixels(batched[3]) - ref).mean() > 5      # another image index: other noise, other image
    assert ref.shape == (128, 128, 3)                        # tiny-sd's default size (latent 16 x 8)


def test_compiled_sampler_gives_the_eager_images(models, sd, monkeypatch):
    """``compile: true`` changes only float rounding: same images within 1/255, same shard fingerprint."""
    from pipeline import models as model_refs

    monkeypatch.setattr(model_refs, "COMPILE_BACKEND", "aot_eager")  # dynamo tracing, no code generation
    items = prompt_items("coco", PROMPTS[:1], 3)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = make_sampler(models, scale=dataclasses.replace(SCALE, compile=True))
    got = compiled.rows(items)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # every step and CFG half: one graph
    torch._dynamo.reset()
    want = sd.rows(items)
    assert [r["status"] for r in got] == [STATUS_OK] * 3
    assert max(np.abs(pixels(g) - pixels(w)).max() for g, w in zip(got, want)) <= 1
    weights = component_hashes(sd.pipe)
    assert component_hashes(compiled.pipe) == weights
    assert compiled.fingerprint(weights) == sd.fingerprint(weights)


@pytest.mark.parametrize("name", ["DDIMScheuler", "AutoencoderKL"])
def test_scheduler_must_be_a_diffusers_scheduler_class(models, name):
    """A wrong class name is a params error (one line, naming the key) before any model is loaded."""
    from pipeline.config import ConfigError, parse

    with pytest.raises(ConfigError, match=f"sampling: scheduler: '{name}' is not a diffusers scheduler class"):
        parse(SamplingCfg, {"scheduler": name}, "sampling")
    assert type(make_sampler(models, cfg=SamplingCfg(scheduler="DDIMScheduler")).pipe.scheduler).__name__ == "DDIMScheduler"


def test_unet_swap_changes_only_the_unet(models, sd):
    swapped = make_sampler(models, unet="embedded:tiny-sd-unet-a")
    hb, hs = component_hashes(sd.pipe), component_hashes(swapped.pipe)
    assert hb["unet"] != hs["unet"]
    assert (hb["vae"], hb["text_encoder"]) == (hs["vae"], hs["text_encoder"])


def test_attend_and_excite_runs_on_the_tiny_model(sd, ae):
    """A&E without latent updates is plain SD from the same noise; with the default step it moves the image."""
    items = prompt_items("coco", PROMPTS[:1], 1)
    rows = ae.rows(items)
    assert [r["status"] for r in rows] == [STATUS_OK]
    assert rows[0]["token_indices"] == [5, 8, 11, 14, 18, 19]
    no_update = AttendExciteCfg(scale_factor=0.0, thresholds={})
    still = dataclasses.replace(ae, cfg=SamplingCfg(attend_excite=no_update)).rows(items)
    plain = sd.rows(items)
    assert np.abs(pixels(still[0]) - pixels(plain[0])).max() <= 1
    assert np.abs(pixels(rows[0]) - pixels(plain[0])).mean() > 0.05


@pytest.mark.parametrize("kind", ["sd", "attend_excite"])
def test_settings_reach_the_pipeline_call(sd, ae, monkeypatch, kind):
    """What the pipeline receives: guidance, steps, size, the seeded latents and, for A&E, the SPEC §6.3 token
    indices and the §6.1 arguments from params (a stub records the call instead of sampling)."""
    ae_cfg = AttendExciteCfg(max_iter_to_alter=7, thresholds={0: 0.1, 3: 0.6}, scale_factor=11.0, attn_res=[2, 2])
    sampler = dataclasses.replace(sd if kind == "sd" else ae,
                                  cfg=SamplingCfg(guidance_scale=3.25, attend_excite=ae_cfg))
    calls = []

    class Output:
        def __init__(self, n):
            self.images = np.zeros((n, sampler.size, sampler.size, 3), np.float32)

    def record(pipe, **kw):
        calls.append(kw)
        return Output(len(kw["prompt"]))

    monkeypatch.setattr(type(sampler.pipe), "__call__", record)
    items = prompt_items("coco", PROMPTS[:1], 2)
    sampler.rows(items)
    (kw,) = calls
    assert kw["guidance_scale"] == 3.25 and kw["num_inference_steps"] == sampler.scale.num_inference_steps
    assert kw["height"] == kw["width"] == sampler.size and kw["prompt"] == [PROMPTS[0].text] * 2
    expected = standard_normal([image_generator(sampler.seed, it) for it in items], sampler.latent_shape())
    torch.testing.assert_close(kw["latents"], expected)
    if kind == "sd":
        assert "token_indices" not in kw
    else:
        assert kw["token_indices"] == [[5, 8, 11, 14, 18, 19]] * 2
        assert (kw["max_iter_to_alter"], kw["thresholds"], kw["scale_factor"], kw["attn_res"]) == (
            7, {0: 0.1, 3: 0.6}, 11.0, (2, 2))


def test_unalignable_prompt_is_recorded_not_dropped(ae):
    bad = MultiGenPrompt(7, "a photo of something else.", ("kite", "cup", "book", "vase", "boat"))
    rows = ae.rows(prompt_items("coco", [bad], 2))
    assert [r["status"] for r in rows] == [STATUS_TOKENS_FAILED] * 2
    assert "'kite'" in rows[0]["error"] and rows[0]["image"] is None


def test_nan_image_is_recorded(sd, monkeypatch):
    sampler = sd
    monkeypatch.setattr(Sampler, "_call", lambda self, items, tok: np.full((len(items), 8, 8, 3), np.nan))
    rows = sampler.rows(prompt_items("coco", PROMPTS[:1], 2))
    assert [r["status"] for r in rows] == [STATUS_NAN] * 2 and "float32" in rows[0]["error"]


def test_a_failing_batch_is_retried_image_by_image(sd, monkeypatch):
    """One bad image must not take the other images of its batch down with it."""
    from pipeline.sampling.sampler import STATUS_FAILED

    def call(self, items, tok):
        if any(it.image_index == 1 for it in items):
            raise RuntimeError("out of memory")
        return np.zeros((len(items), 8, 8, 3), dtype=np.float32)

    monkeypatch.setattr(Sampler, "_call", call)
    rows = sd.rows(prompt_items("coco", PROMPTS[:1], 3))
    assert [r["status"] for r in rows] == [STATUS_OK, STATUS_FAILED, STATUS_OK]
    assert "out of memory" in rows[1]["error"] and rows[0]["image"] is not None


def test_resume_after_a_kill_gives_the_uninterrupted_result(sd, tmp_path, monkeypatch):
    sampler = dataclasses.replace(sd, scale=dataclasses.replace(SCALE, images_per_prompt=2, shard_size=2))
    full = tmp_path / "full"
    sample_prompt_set(sampler, "coco", PROMPTS, full, {"w": "1"})
    killed = tmp_path / "killed"
    calls = {"n": 0}
    real_rows = Sampler.rows

    def dies_on_second_shard(self, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_rows(self, items)

    monkeypatch.setattr(Sampler, "rows", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        sample_prompt_set(sampler, "coco", PROMPTS, killed, {"w": "1"})
    first = shard_path(killed, 0)
    assert first.exists() and not shard_path(killed, 1).exists()
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(Sampler, "rows", real_rows)
    sample_prompt_set(sampler, "coco", PROMPTS, killed, {"w": "1"})
    assert first.stat().st_mtime_ns == stamp                      # kept, not redone
    a, b = read_shards(full), read_shards(killed)
    assert a[["prompt_id", "image_index", "status"]].equals(b[["prompt_id", "image_index", "status"]])
    assert all(np.abs(pixels(x) - pixels(y)).max() <= 1 for x, y in zip(a.to_dict("records"), b.to_dict("records")))
    assert len(a) == 4


def test_fingerprint_holds_what_changes_images_and_not_how_many(sd):
    weights = component_hashes(sd.pipe)
    same = [dict(batch_size=1), dict(compile=True), dict(max_prompts=7), dict(images_per_prompt=5),
            dict(shard_size=5)]
    for change in same:
        other = dataclasses.replace(sd, scale=dataclasses.replace(sd.scale, **change))
        assert other.fingerprint(weights) == sd.fingerprint(weights), change
    for change in (dict(num_inference_steps=3), dict(resolution=64)):
        other = dataclasses.replace(sd, scale=dataclasses.replace(sd.scale, **change))
        assert other.fingerprint(weights) != sd.fingerprint(weights), change
    assert dataclasses.replace(sd, seed=1).fingerprint(weights) != sd.fingerprint(weights)
    assert sd.fingerprint({**weights, "unet": "other"}) != sd.fingerprint(weights)


def test_more_prompts_keep_the_images_of_the_first_ones(sd, tmp_path, monkeypatch):
    """max_prompts 1 -> 2 at one prompt per shard: the first prompt's shard is kept, only the second sampled."""
    sampler = dataclasses.replace(sd, scale=dataclasses.replace(SCALE, images_per_prompt=2, shard_size=2))
    sample_prompt_set(sampler, "coco", PROMPTS[:1], tmp_path, {"w": "1"})
    first = shard_path(tmp_path, 0).read_bytes()
    sampled = []
    real_rows = Sampler.rows
    monkeypatch.setattr(Sampler, "rows", lambda self, items: sampled.extend(i.prompt_id for i in items)
                        or real_rows(self, items))
    sample_prompt_set(sampler, "coco", PROMPTS[:2], tmp_path, {"w": "1"})
    assert sampled == [PROMPTS[1].prompt_id] * 2 and shard_path(tmp_path, 0).read_bytes() == first
    assert read_shards(tmp_path)["prompt_id"].tolist() == [PROMPTS[0].prompt_id] * 2 + [PROMPTS[1].prompt_id] * 2


def test_params_sections_parse_in_both_profiles():
    params = load_params(REPO / "params.yaml")
    section(params, "sampling", SamplingCfg)
    for profile in params["profiles"]:
        p = dict(params, profile=profile)
        section(p, "profile.sampling", SamplingScale)
        for key in params["eval_models"]:
            section(p, f"eval_models.{key}", EvalModel)
            section(p, f"profile.eval_models.{key}", EvalModelRef)


def test_seed_depends_on_prompt_set_prompt_and_image():
    from pipeline.sampling.items import SampleItem, image_generator
    from pipeline.seeding import torch_generator

    item = SampleItem("coco", 0, 0, "t", ("a",))
    draw = lambda g: torch.randn(8, generator=g)
    assert not torch.equal(draw(image_generator(0, item)), draw(image_generator(0, SampleItem("ade20k", 0, 0, "t", ("a",)))))
    assert torch.equal(draw(image_generator(0, item)), draw(torch_generator(0, "multigen", "coco", 0, 0)))


def test_prompt_items_are_prompt_major():
    from pipeline.sampling.items import prompt_items

    prompts = [MultiGenPrompt(0, "x", ("a",)), MultiGenPrompt(1, "y", ("b",))]
    assert [(i.prompt_id, i.image_index) for i in prompt_items("coco", prompts, 2)] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("reds, index", [(73, 75), (74, None), (75, None)])
def test_token_indices_stop_before_the_end_of_text_token(clip_tokenizer, reds, index):
    """Position 76 holds EOT once the pipeline truncates a long prompt to 77 tokens, so 75 is the last."""
    text = "red " * reds + "a cat and a dog"
    if index is None:
        with pytest.raises(TokenIndexError, match="reach EOT"):
            ae_token_indices(clip_tokenizer, text, ("cat",))
    else:
        assert ae_token_indices(clip_tokenizer, text, ("cat",)) == [index]


def test_earlier_article_wins(clip_tokenizer):
    assert ae_token_indices(clip_tokenizer, "an apple and a apple", ("apple",)) == [2]


def test_image_with_one_nan_pixel_is_recorded(monkeypatch):
    from pipeline.sampling import sampler as sampling

    sampler = sampling.Sampler.__new__(sampling.Sampler)
    sampler.kind, sampler.scale, sampler._tokens = "sd", SamplingScale(batch_size=2), {}
    images = np.zeros((2, 8, 8, 3), np.float32)
    images[1, 0, 0, 0] = np.nan
    monkeypatch.setattr(sampling.Sampler, "_call", lambda self, items, tokens: images)
    rows = sampler.rows(sampling.prompt_items("coco", [MultiGenPrompt(0, "x", ("a",))], 2))
    assert [r["status"] for r in rows] == [STATUS_OK, sampling.STATUS_NAN]


def test_eval_model_refuses_a_dep_whose_weights_are_not_loaded(monkeypatch):
    """A checkpoint named in ``dep`` but not loaded (``unet: null``) would be scored as the base model."""
    import copy

    from pipeline.config import ConfigError
    from pipeline.eval_models import eval_model

    monkeypatch.chdir(REPO)
    params = load_params(REPO / "params.yaml")
    for key in params["eval_models"]:  # every shipped model passes, in both profiles
        for profile in ("demo", "paper"):
            eval_model({**params, "profile": profile}, key)
    checkpoint = "artifacts/train/checkpoints/checkpoint-20/unet"
    params = copy.deepcopy(params)
    params["eval_models"]["trained_20"] = {"dep": checkpoint, "sampler": "sd"}
    demo = params["profiles"]["demo"]["eval_models"]
    demo["trained_20"] = {"model": "embedded:tiny-sd", "unet": None, "note": "step 20"}
    with pytest.raises(ConfigError, match=r"eval_models.trained_20.dep is .*checkpoint-20/unet.*unet None"):
        eval_model(params, "trained_20")
    demo["trained_20"]["unet"] = checkpoint
    model, ref = eval_model(params, "trained_20")
    assert model.dep == checkpoint and ref.unet == checkpoint
    demo["trained_20"]["unet"] = "artifacts/train/checkpoints/checkpoint-10/unet"
    with pytest.raises(ConfigError, match="Point its unet"):
        eval_model(params, "trained_20")


def test_checkpoint_unet_records_its_step_and_training_run(tmp_path, caplog):
    from pipeline.eval_models import checkpoint_of

    unet = tmp_path / "checkpoints" / "checkpoint-20" / "unet"
    unet.mkdir(parents=True)
    (unet.parent / "state.json").write_text('{"step": 20, "fingerprint": "aaaa"}')
    train = tmp_path / "training_run.json"
    train.write_text('{"fingerprint": "aaaa", "steps": 30}')
    assert checkpoint_of(str(unet), train) == {"unet_checkpoint_step": 20, "unet_checkpoint_fingerprint": "aaaa"}
    assert "another experiment" not in caplog.text
    train.write_text('{"fingerprint": "bbbb", "steps": 30}')  # the workspace's trained UNet comes from another run
    assert checkpoint_of(str(unet), train)["unet_checkpoint_fingerprint"] == "aaaa"
    assert "comes from the training run aaaa" in caplog.text and "bbbb" in caplog.text
    assert checkpoint_of("artifacts/train/unet", train) == {} and checkpoint_of(None, train) == {}
    assert checkpoint_of("embedded:tiny-sd-unet-a", train) == {}
