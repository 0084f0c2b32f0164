"""FID building blocks: the Fréchet distance against closed forms and torch-fidelity, streamed statistics,
the embedded tiny extractor, and the Inception extractor's offline loading."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pipeline.config import MissingInputError
from pipeline.photorealism.features import (INCEPTION_DIM, INCEPTION_WEIGHTS_FILE, InceptionFeatureExtractor,
                                            TinyFeatureExtractor, WeightsError, build_tiny_extractor,
                                            default_inception_weights_path)
from pipeline.photorealism.fid import FeatureStats, fid_of, frechet_distance


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def diagonal_closed_form(mu1, a, mu2, b) -> float:
    """FID of N(mu1, diag a) and N(mu2, diag b): ||mu1 - mu2||² + Σ (√a_i - √b_i)²."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


# ------------------------------------------------------------------------------------------ Fréchet distance


def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(300, 32)) * 3 + 1
    mu, sigma = gaussian_stats(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_fid_equals_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    a, b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = diagonal_closed_form(mu1, a, mu2, b)
    assert expected == pytest.approx(1 + 0 + 4 + 1 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0 + (2 ** .5 - .5 ** .5) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_equals_closed_form_for_commuting_non_diagonal_covariances():
    """S1 = Q diag(a) Qᵀ, S2 = Q diag(b) Qᵀ share eigenvectors, so the diagonal closed form still holds."""
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 5)))
    a, b = np.array([1.0, 2.0, 3.0, 0.5, 0.1]), np.array([0.2, 2.0, 1.0, 4.0, 0.1])
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1]
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(diagonal_closed_form(mu1, a, mu2, b), rel=1e-10)


def test_fid_from_large_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    x = rng.normal(mu1, np.sqrt(a), size=(200_000, 3))
    y = rng.normal(mu2, np.sqrt(b), size=(200_000, 3))
    expected = diagonal_closed_form(mu1, a, mu2, b)  # 2.4216...
    got = fid_of(FeatureStats(3).update(x), FeatureStats(3).update(y))
    assert got == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("n, dim", [(400, 16), (50, 8), (10, 32)])  # the last: rank-deficient covariances
def test_fid_matches_torch_fidelity(n, dim):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(n + dim)
    x = rng.normal(size=(n, dim))
    y = rng.normal(0.2, 1.3, size=(n, dim)) + 0.1 * x
    (mu1, s1), (mu2, s2) = gaussian_stats(x), gaussian_stats(y)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs[KEY_METRIC_FID], rel=1e-6)


def test_singular_product_uses_the_eps_offset():
    """sqrtm of a nilpotent product is not finite; the eps offset on both diagonals makes it so."""
    nilpotent, eye = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    got = frechet_distance(np.zeros(2), nilpotent, np.zeros(2), eye, eps=1e-6)
    assert np.isfinite(got) and got == pytest.approx(2.0, abs=1e-2)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


# ------------------------------------------------------------------------------------------ FeatureStats


def test_streamed_stats_equal_numpy_on_all_features(tmp_path):
    rng = np.random.default_rng(3)
    features = rng.normal(0.5, 2.0, size=(157, 12)).astype(np.float32)
    stats = FeatureStats(12)
    for start, stop in [(0, 1), (1, 40), (40, 41), (41, 120), (120, 157)]:  # uneven batches, one of one row
        stats.update(features[start:stop])
    assert stats.count == 157
    np.testing.assert_allclose(stats.mean, features.astype(np.float64).mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features.astype(np.float64), rowvar=False), rtol=0, atol=1e-10)
    assert stats.cov.dtype == np.float64 and np.array_equal(stats.cov, stats.cov.T)

    written = stats.save(tmp_path / "ref")
    assert written == tmp_path / "ref.npz"
    loaded = FeatureStats.load(written)
    assert loaded.dim == 12 and loaded.count == 157
    assert np.array_equal(loaded.sum, stats.sum) and np.array_equal(loaded.outer, stats.outer)
    assert fid_of(loaded, stats) == pytest.approx(0.0, abs=1e-9)
    loaded.update(features[:3])  # a loaded file keeps streaming
    assert loaded.count == 160


def test_stats_refuse_wrong_input(tmp_path):
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match="no features"):
        stats.mean
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        stats.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(np.full((2, 4), np.nan))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.cov
    np.savez(tmp_path / "other.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match="other.npz"):
        FeatureStats.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        FeatureStats.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="dimensions differ"):
        fid_of(FeatureStats(4), FeatureStats(5))


# ------------------------------------------------------------------------------------------ tiny extractor


def random_images(seed: int, n: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def test_tiny_extractor_is_deterministic_per_seed(tmp_path):
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        build_tiny_extractor(tmp_path / name, seed)
    for name in ("fid_tiny.safetensors", "fid_tiny.json"):  # same seed, same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    images = random_images(0, 5, 48, 40)
    fa = TinyFeatureExtractor.load(tmp_path / "a")(images)
    fb = TinyFeatureExtractor.load(tmp_path / "b")(images)
    fc = TinyFeatureExtractor.load(tmp_path / "c")(images)
    np.testing.assert_array_equal(fa, fb)  # bit-identical for one batch size
    assert not np.allclose(fa, fc, rtol=1e-2, atol=0)
    # another batch size changes float32 conv blocking only: equal to float rounding
    np.testing.assert_allclose(TinyFeatureExtractor.load(tmp_path / "a", batch_size=2)(images), fa,
                               rtol=1e-4, atol=1e-6)


def test_tiny_extractor_maps_any_size_to_64_features(tmp_path):
    build_tiny_extractor(tmp_path, 0)
    extractor = TinyFeatureExtractor.load(tmp_path, batch_size=3)
    assert extractor.dim == 64
    for n, height, width in [(1, 64, 64), (4, 128, 96), (7, 33, 200)]:
        features = extractor(random_images(n, n, height, width))
        assert features.shape == (n, 64) and features.dtype == np.float64 and np.isfinite(features).all()
    other = random_images(1, 6, 80, 80)
    assert np.std(extractor(other), axis=0).max() > 0  # different images give different features
    stats = extractor.stats([random_images(2, 3, 64, 64), random_images(3, 5, 96, 64)])
    assert stats.count == 8 and stats.dim == 64
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        extractor(np.zeros((1, 8, 8), dtype=np.uint8))


def test_tiny_extractor_missing_files_name_the_path(tmp_path):
    with pytest.raises(MissingInputError, match=re.escape(str(tmp_path / "fid_tiny.json"))):
        TinyFeatureExtractor.load(tmp_path)


# ------------------------------------------------------------------------------------------ Inception-v3


def test_missing_inception_weights_give_a_clear_error(tmp_path):
    path = tmp_path / "nowhere" / INCEPTION_WEIGHTS_FILE
    with pytest.raises(MissingInputError, match=re.escape(str(path))) as info:
        InceptionFeatureExtractor(path)
    message = str(info.value)
    assert INCEPTION_WEIGHTS_FILE in message and str(default_inception_weights_path()) in message
    assert "docs/fid.md" in message and "https://" in message  # how to get it, without trying to download


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A state dict with torch-fidelity's Inception-v3 keys and seeded random weights (no download).

    torch-fidelity always loads a state dict in its constructor; a subclass that ignores the (empty) one
    keeps PyTorch's default initialisation, whose state dict is then saved.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth"))
    path = folder / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_extractor_with_random_weights_gives_2048_features(random_inception_weights):
    extractor = InceptionFeatureExtractor(random_inception_weights, verify_hash=False, batch_size=2)
    assert extractor.dim == INCEPTION_DIM == 2048
    features = extractor(random_images(4, 3, 64, 80))  # resized to 299 inside the network
    assert features.shape == (3, 2048) and features.dtype == np.float64 and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1], rtol=1e-3, atol=0)  # random weights: tiny values


def test_inception_extractor_checks_the_weights_file(random_inception_weights, tmp_path):
    with pytest.raises(WeightsError, match="6726825d"):
        InceptionFeatureExtractor(random_inception_weights, verify_hash=True)
    truncated = tmp_path / "truncated.pth"
    state = torch.load(random_inception_weights, weights_only=True)
    torch.save({k: v for k, v in list(state.items())[:10]}, truncated)
    with pytest.raises(WeightsError, match="does not fit"):
        InceptionFeatureExtractor(truncated, verify_hash=False)
    pickled = tmp_path / "pickled.pth"
    torch.save({"not a tensor": object()}, pickled)
    with pytest.raises(WeightsError, match="plain tensor state dict"):
        InceptionFeatureExtractor(pickled, verify_hash=False)
