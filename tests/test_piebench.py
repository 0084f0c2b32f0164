"""PIE-Bench metrics (SPEC §5.4-5.6) against independent computations on random images."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import clip_score
from pipeline import piebench as pb
from pipeline.datasets.demo_piebench import write_demo_piebench
from pipeline.datasets.piebench_files import decode_mask, load_example, read_mapping
from pipeline.seeding import derive_seed
from pipeline.store.codecs import png_bytes


@pytest.fixture(scope="module")
def scorer(embedded, models_dir):
    scale = pb.PieBenchScale(dino_model="embedded:tiny-dino", clip_model="embedded:tiny-openclip",
                             lpips_backbone="random")
    embedded("tiny-dino"), embedded("tiny-openclip")
    return pb.PieBenchScorer.load(scale, pb.PieBenchCfg(), models_dir, seed=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    noise = rng.integers(-40, 41, (64, 64, 3))
    edit = np.clip(source.astype(int) + noise, 0, 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:50] = 1
    return source, edit, mask


def reference_background(source, edit, mask):
    keep = (1 - mask.astype(np.float64))[..., None]
    return source / 255.0 * keep, edit / 255.0 * keep


def test_background_psnr_mse_match_numpy(scorer, images):
    source, edit, mask = images
    got = scorer.score(source, edit, mask, "a", "b")
    a, b = reference_background(source, edit, mask)
    mse = ((a - b) ** 2).sum() / a.size  # full frame, zeros included
    assert got["mse_unedit_part"] == pytest.approx(mse, rel=1e-6)
    assert got["psnr_unedit_part"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-6)
    # zeroing the edit region in both images dilutes the error: lower than the unmasked MSE
    assert got["mse_unedit_part"] < ((source / 255.0 - edit / 255.0) ** 2).mean()


def torchmetrics_style_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM as torchmetrics computed it before its PR #2721 (Sept. 2024), written out in NumPy: reflect-pad
    by 5, an 11x11 Gaussian window (sigma 1.5, normalised), population (co)variances, C1 = 0.01^2,
    C2 = 0.03^2 (data range 1), the SSIM map cropped by the pad, mean over pixels and channels.
    a, b: (H, W, C) in [0, 1]."""
    pad, sigma = 5, 1.5
    x = np.arange(-pad, pad + 1, dtype=np.float64)
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    window = np.outer(g, g)

    def blur(img):  # (H, W, C) -> (H, W, C): reflect-padded, then the window over every position
        padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        views = np.lib.stride_tricks.sliding_window_view(padded, (2 * pad + 1, 2 * pad + 1), axis=(0, 1))
        return np.einsum("hwcij,ij->hwc", views, window)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def test_background_ssim_matches_an_independent_computation(scorer, images):
    source, edit, mask = images
    a, b = reference_background(source, edit, mask)
    expected = torchmetrics_style_ssim(a, b)
    assert 0.1 < expected < 0.99  # a real, partial similarity: the comparison can tell settings apart
    assert scorer.score(source, edit, mask, "a", "b")["ssim_unedit_part"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_background_lpips_matches_lpips_package(scorer, images):
    import lpips

    source, edit, mask = images
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, "lpips", "squeeze"))
        net = lpips.LPIPS(net="squeeze", pnet_rand=True, verbose=False).eval()
    a, b = reference_background(source, edit, mask)

    def t(x):
        return torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None] * 2 - 1

    with torch.no_grad():
        expected = float(net(t(a), t(b)))
        unmasked = float(net(t(source / 255.0), t(edit / 255.0)))
    got = scorer.score(source, edit, mask, "a", "b")["lpips_unedit_part"]
    assert got == pytest.approx(expected, rel=1e-5)
    assert got != pytest.approx(unmasked, rel=1e-3)


def open_clip_cosine(path, image, text):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    with torch.no_grad():
        img = model.encode_image(preprocess(Image.fromarray(image))[None])
        txt = model.encode_text(tokenizer([text]))
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return float((img * txt).sum())


TEXTS = ["a photo of a cat", "a photo of a dog", "a red ball", "zebra", "a house on a hill", "two cups",
         "the night sky", "a green boat on a table", "snow", "an old car", "a bowl of fruit", "a kite"]


def positive_text(path, image):
    """A text whose cosine with ``image`` is positive under the tiny random CLIP (found by open_clip)."""
    cosines = {t: open_clip_cosine(path, image, t) for t in TEXTS}
    best = max(cosines, key=cosines.get)
    assert cosines[best] > 0, "no text with a positive cosine; extend TEXTS"
    return best, cosines[best], min(cosines.values())


def test_clip_cosine_matches_open_clip(scorer, images, embedded):
    source, edit, mask = images
    path = embedded("tiny-openclip")
    edit_part = (edit * mask[..., None]).astype(np.uint8)  # background black, edited region kept
    for image in (source, edit, edit_part):
        for text in TEXTS[:4]:
            assert scorer.clip.cosine(image, text) == pytest.approx(open_clip_cosine(path, image, text), abs=1e-5)


def test_clip_scores_are_100_cos_clipped_at_zero(scorer, images, embedded):
    source, edit, mask = images
    path = embedded("tiny-openclip")
    edit_part = (edit * mask[..., None]).astype(np.uint8)
    target, cos_edit, lowest = positive_text(path, edit)
    original, cos_source, _ = positive_text(path, source)
    got = scorer.score(source, edit, mask, original, target)
    assert got["clip_similarity_target_image"] == pytest.approx(100 * cos_edit, abs=1e-3)
    assert got["clip_similarity_source_image"] == pytest.approx(100 * cos_source, abs=1e-3)
    assert got["clip_similarity_target_image_edit_part"] == pytest.approx(
        max(100 * open_clip_cosine(path, edit_part, target), 0.0), abs=1e-3)
    assert lowest < 0  # and a negative cosine scores 0
    negative = min(TEXTS, key=lambda t: open_clip_cosine(path, edit, t))
    assert scorer.clip(edit, negative) == 0.0


def reference_structure(model, source, edit, scale):
    """Keys of the last block recomputed from the hidden states: LayerNorm, then the key weights."""
    from torchvision.transforms.v2 import functional as F

    x = torch.tensor(np.stack([source, edit]), dtype=torch.float32).permute(0, 3, 1, 2) * scale
    x = F.normalize(F.resize(x, [224], antialias=True), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        last = model.layers[-1]
        keys = last.layernorm_before(hidden) @ last.attention.k_proj.weight.T + last.attention.k_proj.bias
    k = keys.numpy().astype(np.float64)
    assert k.shape[1] == 1 + 28 * 28  # CLS + 28x28 patches of 8 px at 224
    n = np.linalg.norm(k, axis=-1, keepdims=True)
    sims = k @ k.transpose(0, 2, 1) / np.maximum(n @ n.transpose(0, 2, 1), 1e-8)
    return ((sims[0] - sims[1]) ** 2).mean()


@pytest.mark.parametrize("input_range,scale", [("0-255", 1.0), ("0-1", 1 / 255)])
def test_structure_distance_matches_manual_keys(embedded, models_dir, images, input_range, scale):
    source, edit, _ = images
    embedded("tiny-dino")
    metric = pb.StructureDistance.load("embedded:tiny-dino", models_dir, input_range)
    expected = reference_structure(metric.model, source, edit, scale)
    assert metric(source, edit) == pytest.approx(expected, rel=1e-4)
    assert metric(source, source) == pytest.approx(0.0, abs=1e-10)


def test_structure_preprocess_keeps_the_aspect_ratio(embedded, models_dir):
    """``Resize(224, max_size=480)`` (SPEC §5.5): the short side to 224 unless the long side would pass 480."""
    embedded("tiny-dino")
    metric = pb.StructureDistance.load("embedded:tiny-dino", models_dir, "0-255")
    wide = np.zeros((1, 256, 512, 3), np.uint8)
    assert tuple(metric.preprocess(wide).shape) == (1, 3, 224, 448)
    assert tuple(metric.preprocess(np.zeros((1, 100, 400, 3), np.uint8)).shape) == (1, 3, 120, 480)


def test_nan_rules(scorer, images):
    source, edit, _ = images
    full = np.ones((64, 64), np.uint8)  # e.g. a style edit: no background
    got = scorer.score(source, edit, full, "a", "b")
    assert all(math.isnan(got[m]) for m in pb.BACKGROUND_METRICS)
    assert not math.isnan(got["clip_similarity_target_image_edit_part"])
    empty = np.zeros((64, 64), np.uint8)  # impossible with the forced border, handled anyway
    got = scorer.score(source, edit, empty, "a", "b")
    assert math.isnan(got["clip_similarity_target_image_edit_part"])
    assert got["psnr_unedit_part"] == pytest.approx(10 * np.log10(1 / ((source / 255 - edit / 255) ** 2).mean()))
    border_only = decode_mask([], size=64)  # PIE-Bench's forced border alone still counts as edited
    assert border_only.any() and not math.isnan(scorer.score(source, edit, border_only, "a", "b")
                                                 ["clip_similarity_target_image_edit_part"])


def test_summarize_scales_skips_nan_and_counts():
    rows = pd.DataFrame([
        {"image_id": "1", "editing_type_id": "1", "status": "ok", **{m: 1.0 for m in pb.METRICS},
         "structure_distance": 0.001, "mse_unedit_part": 0.002},
        {"image_id": "2", "editing_type_id": "9", "status": "ok", **{m: 3.0 for m in pb.METRICS},
         "structure_distance": 0.003, "mse_unedit_part": math.nan, "psnr_unedit_part": math.nan},
        {"image_id": "3", "editing_type_id": "9", "status": "edit_failed", **{m: math.nan for m in pb.METRICS}},
    ])
    out = pb.summarize(rows)
    assert out["images"] == 3 and out["scored"] == 2
    assert out["structure_distance_x1e3"] == pytest.approx(2.0)
    assert out["mse_unedit_part_x1e4"] == pytest.approx(20.0) and out["mse_unedit_part_x1e4.nan"] == 1
    assert out["psnr_unedit_part"] == pytest.approx(1.0) and out["psnr_unedit_part.n"] == 1
    assert out["lpips_unedit_part_x1e3"] == pytest.approx(2000.0)
    assert out["ssim_unedit_part_x1e2"] == pytest.approx(200.0)
    assert out["clip_whole"] == pytest.approx(2.0) and out["clip_edited"] == pytest.approx(2.0)
    assert out["clip_similarity_source_image"] == pytest.approx(2.0)  # not rescaled
    assert out["type_9.scored"] == 1 and out["type_9.structure_distance_x1e3"] == pytest.approx(3.0)
    assert math.isnan(out["type_9.mse_unedit_part_x1e4"])


def test_summarize_skips_infinite_psnr():
    # Identical backgrounds give PSNR = +inf: a NaN-only skip would make the mean inf.
    rows = pd.DataFrame([
        {"image_id": str(i), "editing_type_id": "1", "status": "ok", **{m: 1.0 for m in pb.METRICS},
         "psnr_unedit_part": psnr}
        for i, psnr in enumerate([20.0, math.inf, 30.0])
    ])
    out = pb.summarize(rows)
    assert out["psnr_unedit_part"] == pytest.approx(25.0) and out["type_1.psnr_unedit_part"] == pytest.approx(25.0)
    assert out["psnr_unedit_part.n"] == 2 and out["psnr_unedit_part.nan"] == 1


def test_jpeg_roundtrip_and_resize():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")  # PIL default quality
    np.testing.assert_array_equal(pb.jpeg_roundtrip(img), np.asarray(Image.open(buf)))
    cfg = pb.PieBenchCfg(jpeg_roundtrip=False)
    np.testing.assert_array_equal(pb.prepare_edit(img, (32, 32), cfg), img)
    assert pb.prepare_edit(img, (64, 64), cfg).shape == (64, 64, 3)


def test_open_clip_references(tmp_path, models_dir, embedded):
    embedded("tiny-openclip")
    assert clip_score.open_clip_name("ViT-L-14:openai", models_dir) == ("ViT-L-14", "openai")
    assert clip_score.open_clip_name("hf-hub:org/repo", models_dir) == ("hf-hub:org/repo", None)
    assert clip_score.open_clip_name("embedded:tiny-openclip", models_dir)[0] == f"local-dir:{models_dir / 'tiny-openclip'}"
    assert clip_score.open_clip_name(str(tmp_path), models_dir) == (f"local-dir:{tmp_path}", None)
    with pytest.raises(ValueError, match="ARCH:TAG"):
        clip_score.open_clip_name("ViT-L-14", models_dir)


@pytest.mark.parametrize("ref, quick_gelu", [("ViT-B-32:openai", True), ("ViT-B-32:laion2b_s34b_b79k", False)])
def test_clip_activation_is_the_one_the_weights_were_trained_with(monkeypatch, tmp_path, ref, quick_gelu):
    """OpenAI's weights need QuickGELU, which open_clip's built-in configs lack (it only warns)."""
    import open_clip

    real = open_clip.create_model_and_transforms

    def without_download(name, pretrained=None, **kwargs):  # same config path, random weights
        assert pretrained == ref.split(":")[1]
        return real(name, pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", without_download)
    model = clip_score.ClipSimilarity.load(ref, tmp_path).model
    activations = {type(m).__name__ for m in model.modules() if "GELU" in type(m).__name__}
    assert activations == ({"QuickGELU"} if quick_gelu else {"GELU"})


def test_score_edits_keeps_every_entry_with_a_status(scorer, tmp_path):
    write_demo_piebench(tmp_path, 4, seed=0, size=64)
    entries = read_mapping(tmp_path / "mapping_file.json")
    ids = sorted(entries)
    sources = {i: load_example(tmp_path, entries[i])[0] for i in ids}
    edits = {ids[0]: {"image": png_bytes(sources[ids[0]]), "status": "ok", "error": ""},
             ids[1]: {"image": None, "status": "edit_failed", "error": "boom"},
             ids[2]: {"image": png_bytes(sources[ids[2]][:32, :32]), "status": "ok", "error": ""}}
    scores, panels = pb.score_edits(scorer, tmp_path, entries, edits, pb.PieBenchCfg(), panels=1)
    by_id = scores.set_index("image_id")
    assert list(scores["image_id"]) == list(entries)
    assert by_id.loc[ids[0], "status"] == "ok" and by_id.loc[ids[0], "structure_distance"] < 1e-3
    assert by_id.loc[ids[0], "psnr_unedit_part"] > 30  # only the JPEG round trip differs
    assert by_id.loc[ids[1], "status"] == "edit_failed" and math.isnan(by_id.loc[ids[1], "psnr_unedit_part"])
    assert by_id.loc[ids[2], "status"] == "ok"  # smaller edit: resized to the source before scoring
    assert by_id.loc[ids[3], "status"] == "missing_edit"
    assert len(panels) == 1 and panels[0][1].shape == (64, 64, 3)
    pb.edits_figure(panels, tmp_path / "fig.png")
    assert Image.open(tmp_path / "fig.png").size[0] > 100


@pytest.mark.parametrize("name,weights", [("tiny-dino", "model.safetensors"),
                                          ("tiny-openclip", "open_clip_model.safetensors")])
def test_embedded_metric_models_are_seeded(tmp_path, name, weights):
    from pipeline import zoo

    blobs = [(zoo.build(name, tmp_path / f"{name}-{i}", seed) / weights).read_bytes()
             for i, seed in enumerate((0, 0, 1))]
    assert blobs[0] == blobs[1] and blobs[0] != blobs[2]


def test_prepare_edit_resizes_to_height_width_and_uses_the_configured_quality():
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert pb.prepare_edit(img, (48, 64), pb.PieBenchCfg(jpeg_roundtrip=False)).shape == (48, 64, 3)
    for quality in (75, 90):
        np.testing.assert_array_equal(pb.prepare_edit(img, (32, 32), pb.PieBenchCfg(jpeg_quality=quality)),
                                      pb.jpeg_roundtrip(img, quality))


def test_clip_scores_use_each_prompt_where_the_benchmark_does(scorer, images, monkeypatch):
    """Whole image: original prompt on the source, editing prompt on the edit; edited part: editing prompt
    on the edit with everything outside the mask zeroed."""
    source, edit, mask = images
    calls = []
    monkeypatch.setattr(scorer, "clip", lambda image, text: calls.append((image.copy(), text)) or 1.0)
    scorer.score(source, edit, mask, "original prompt", "editing prompt")
    assert [t for _, t in calls] == ["original prompt", "editing prompt", "editing prompt"]
    np.testing.assert_array_equal(calls[2][0], edit * mask[..., None])


def test_background_metrics_exist_while_one_pixel_is_unedited(scorer, images):
    """The NaN rule applies only when the mask covers the whole image."""
    source, edit, _ = images
    mask = np.ones(source.shape[:2], np.uint8)
    mask[0, 0] = 0
    assert not math.isnan(scorer.score(source, edit, mask, "a", "b")["mse_unedit_part"])


def test_prepare_edit_resizes_bicubic():
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(img).resize((64, 48), Image.BICUBIC))
    np.testing.assert_array_equal(pb.prepare_edit(img, (48, 64), pb.PieBenchCfg(jpeg_roundtrip=False)), want)


def test_structure_distance_downsamples_with_antialias(embedded, models_dir):
    """320 px inputs are downsampled to 224 (the other structure test upsamples, where antialias is moot)."""
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)
    edit = np.clip(src.astype(int) + rng.integers(-40, 41, src.shape), 0, 255).astype(np.uint8)
    embedded("tiny-dino")
    metric = pb.StructureDistance.load("embedded:tiny-dino", models_dir, "0-255")
    assert metric(src, edit) == pytest.approx(reference_structure(metric.model, src, edit, 1.0), rel=1e-4)
