"""Fréchet distance between two feature distributions, and streamed feature statistics.

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
NeurIPS 2017) fits a Gaussian to each set of image features and reports the Fréchet (2-Wasserstein)
distance between the two Gaussians N(mu1, S1) and N(mu2, S2):

    d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Means and covariances are accumulated batch by batch in float64 (:class:`FeatureStats`), so a stage never
holds all features in memory, and saved as ``.npz`` so reference statistics (COCO, Flickr30K) are computed
once. The matrix square root follows the standard implementations (TTUR, pytorch-fid, clean-fid):
``scipy.linalg.sqrtm`` of the product, an ``eps`` offset on both diagonals when the product is singular
enough to give non-finite values, and a negligible imaginary part dropped (a large one is an error).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from scipy import linalg

from pipeline.config import MissingInputError

log = logging.getLogger(__name__)

STATS_FORMAT = "feature-stats-v1"


def _matrix(name: str, value: np.ndarray, dim: int) -> np.ndarray:
    """``value`` as a float64 (dim, dim) array, or ``ValueError`` naming ``name``."""
    value = np.atleast_2d(np.asarray(value, dtype=np.float64))
    if value.shape != (dim, dim):
        raise ValueError(f"{name}: expected shape ({dim}, {dim}), got {value.shape}")
    return value


def _sqrtm_of_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> np.ndarray:
    """(D, D) real square root of ``sigma1 @ sigma2``, with the ``eps`` diagonal offset where it is singular."""
    with warnings.catch_warnings():  # scipy warns on a singular product; the finiteness check below decides
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("Fréchet distance: singular covariance product; adding %g to the diagonal of both", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrt(S1 S2) has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not valid")
        covmean = covmean.real
    return covmean


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017).

    ``||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))`` in float64.

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances.
        eps: diagonal offset used only when the product ``sigma1 @ sigma2`` is too singular for ``sqrtm``.

    Returns:
        The distance as a Python float (the FID when the inputs are Inception pool3 statistics).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be two (D,) vectors of one length, got {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    sigma1, sigma2 = _matrix("sigma1", sigma1, dim), _matrix("sigma2", sigma2, dim)
    diff = mu1 - mu2
    covmean = _sqrtm_of_product(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FeatureStats:
    """Running count, sum and sum of outer products of (N, D) feature batches, in float64.

    ``update`` batch by batch; ``mean`` and ``cov`` (``ddof=1``, as ``np.cov`` and the standard FID code)
    then equal those of all rows at once. ``save`` / ``load`` keep the sums, so statistics can be extended
    later and reference statistics are computed once.
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"feature dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.count = 0
        self.sum = np.zeros(self.dim, dtype=np.float64)  # (D,)
        self.outer = np.zeros((self.dim, self.dim), dtype=np.float64)  # (D, D): sum of x xᵀ

    def update(self, features: np.ndarray) -> FeatureStats:
        """Add the rows of ``features`` (N, D) (any real dtype; accumulated in float64). Returns ``self``."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features: expected shape (N, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features: non-finite values (NaN or inf); the extractor's input or weights are broken")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x
        return self

    @property
    def mean(self) -> np.ndarray:
        """(D,) mean of all rows added so far."""
        if self.count < 1:
            raise ValueError("FeatureStats: no features added yet")
        return self.sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """(D, D) unbiased covariance (``ddof=1``) of all rows added so far."""
        if self.count < 2:
            raise ValueError(f"FeatureStats: a covariance needs at least 2 feature rows, got {self.count}")
        mean = self.mean
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return (cov + cov.T) / 2  # exactly symmetric

    def save(self, path: str | Path) -> Path:
        """Write the sums to ``path`` (``.npz``; numpy adds the suffix when missing). Returns the file written."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        np.savez(path, format=np.array(STATS_FORMAT), count=np.array(self.count, dtype=np.int64),
                 sum=self.sum, outer=self.outer)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Statistics written by :meth:`save`; :class:`~pipeline.config.MissingInputError` (a
        ``FileNotFoundError``) or ``ValueError`` name the file."""
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"{path}: feature statistics not found; compute them with FeatureStats.save")
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data or str(data["format"]) != STATS_FORMAT:
                raise ValueError(f"{path}: not a {STATS_FORMAT} file (keys {sorted(data.keys())})")
            stats = cls(int(data["sum"].shape[0]))
            stats.count = int(data["count"])
            stats.sum = np.array(data["sum"], dtype=np.float64)
            stats.outer = np.array(data["outer"], dtype=np.float64)
        if stats.outer.shape != (stats.dim, stats.dim) or stats.count < 0:
            raise ValueError(f"{path}: inconsistent statistics (sum {stats.sum.shape}, outer {stats.outer.shape})")
        return stats


def fid_of(stats1: FeatureStats, stats2: FeatureStats, eps: float = 1e-6) -> float:
    """:func:`frechet_distance` between the Gaussians fitted to two :class:`FeatureStats` of one dimension."""
    if stats1.dim != stats2.dim:
        raise ValueError(f"feature dimensions differ: {stats1.dim} vs {stats2.dim} (different extractors?)")
    return frechet_distance(stats1.mean, stats1.cov, stats2.mean, stats2.cov, eps=eps)
