"""Feature statistics and the Frechet distance of FVD, as StyleGAN-V computes them, but stable.

Statistics follow StyleGAN-V's FeatureStats: features cast to float32, accumulated in float64,
mean = sum / N and covariance = sum(x x^T) / N - mu mu^T (divided by N, not N - 1).

The distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) uses tr sqrt(S1 S2) =
tr sqrt(sqrt(S1) S2 sqrt(S1)), where both square roots are of symmetric positive semi-definite
matrices and come from symmetric eigen-decompositions with negative rounding noise clipped to 0.
So the result is never NaN, never complex and never negative (the official FVDM logs show
scipy.linalg.sqrtm failing on long-video features: 1e11 and negative FVDs).
"""

from __future__ import annotations

import warnings

import numpy as np


class FeatureStats:
    """Running float64 sums of features (N, D) for mean and covariance."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self._sum = np.zeros(self.dim, np.float64)
        self._outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features) -> None:
        x = np.asarray(features, np.float32).astype(np.float64).reshape(-1, self.dim)
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or inf; check the detector inputs")
        self.count += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ValueError("no features were accumulated")
        mean = self._sum / self.count
        cov = self._outer / self.count - np.outer(mean, mean)
        return mean, (cov + cov.T) / 2

    def save(self, path: str) -> None:
        np.savez(path, count=self.count, sum=self._sum, outer=self._outer)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as data:
            stats = cls(data["sum"].shape[0])
            stats.count = int(data["count"])
            stats._sum = data["sum"]
            stats._outer = data["outer"]
        return stats


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (negative rounding noise clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(sqrt(S1) S2 sqrt(S1)), in float64, >= 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: means {mu1.shape} vs {mu2.shape}, "
            f"covariances {sigma1.shape} vs {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))
    distance = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return max(distance, 0.0)


def fvd_from_stats(real: FeatureStats, fake: FeatureStats) -> float:
    """FVD between two accumulated feature sets; warns when a set has fewer samples than dims."""
    for name, stats in (("real", real), ("generated", fake)):
        if stats.count < stats.dim:
            warnings.warn(
                f"{stats.count} {name} videos for {stats.dim}-d features: the covariance is "
                f"rank-deficient and FVD is biased; use at least {stats.dim} (2048 is standard)",
                stacklevel=2,
            )
    return frechet_distance(*real.mean_cov(), *fake.mean_cov())
