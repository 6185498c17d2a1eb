"""The Frechet distance of FVD: StyleGAN-V's statistics, agreement with the textbook sqrtm
formula where that is well defined, and stability where it is not."""

import warnings

import numpy as np
import pytest
import scipy.linalg

from fvdm_jax.evaluation.fvd import FeatureStats, frechet_distance, fvd_from_stats


def reference_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def stats_of(x):
    s = FeatureStats(x.shape[1])
    for chunk in np.array_split(x, 3):  # accumulation order must not matter
        s.update(chunk)
    return s


def test_statistics_follow_stylegan_v():
    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32) * 3 + 1
    mean, cov = stats_of(x).mean_cov()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x64, rowvar=False, bias=True), rtol=1e-9, atol=1e-12)


def test_matches_sqrtm_formula_on_well_conditioned_data():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4000, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((4000, 16)) @ rng.standard_normal((16, 16)) + 0.5
    ma, sa = stats_of(a).mean_cov()
    mb, sb = stats_of(b).mean_cov()
    assert frechet_distance(ma, sa, mb, sb) == pytest.approx(reference_fid(ma, sa, mb, sb), rel=1e-8)
    assert frechet_distance(ma, sa, mb, sb) == pytest.approx(frechet_distance(mb, sb, ma, sa), rel=1e-8)


def sample_space_fid(x, y):
    """The Frechet distance of two feature sets computed in sample space, in float64: with centered
    A (n1, d) and B (n2, d), S1 = A^T A / n1 and S2 = B^T B / n2, the non-zero eigenvalues of S1 S2
    are the squared singular values of A B^T / sqrt(n1 n2), so tr sqrt(S1 S2) is the nuclear norm
    of that small (n1, n2) matrix. Exact for rank-deficient covariances, where scipy's sqrtm of the
    singular d x d product is not (it gives -3e-5 for two identical 64-sample sets)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a, b = x - x.mean(0), y - y.mean(0)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(len(a) * len(b))
    traces = np.sum(a * a) / len(a) + np.sum(b * b) / len(b)
    return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + traces - 2 * cross), float(traces)


def test_rank_deficient_sets_give_the_exact_value():
    """64 (or 40) videos of 400-d features: covariances of rank 63 (39). The value equals the
    sample-space computation for far sets (y scaled 1e-3: the cross term is small), near sets
    (y = x + noise: FVD 3.7 is a small difference of traces near 800, where the square root's
    accuracy shows) and unrelated sets; identical sets give 0, never NaN or a negative."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 400)).astype(np.float32)
    s = stats_of(x)
    with pytest.warns(UserWarning, match="rank-deficient"):
        assert fvd_from_stats(s, s) == pytest.approx(0.0, abs=1e-9)
    for seed in range(3):
        other = np.random.default_rng(seed + 10).standard_normal((64, 400)).astype(np.float32)
        for y in (other * 1e-3, x + 0.1 * other, other, other[:40]):
            with pytest.warns(UserWarning, match="rank-deficient"):
                value = fvd_from_stats(s, stats_of(y))
            expected, traces = sample_space_fid(x, y)
            # The float64 eigensolver leaves the ~340 zero eigenvalues of the d x d product at
            # ~1e-14 instead of 0, and their square roots add ~1e-5 to the trace term: 1e-7 of
            # the traces bounds that with a 3x margin (a float32 square root: off by 2e-4 to 0.5).
            assert value == pytest.approx(expected, rel=1e-9, abs=1e-7 * traces), (seed, len(y))


def test_cached_statistics_round_trip_and_errors(tmp_path):
    x = np.random.default_rng(3).standard_normal((100, 5))
    s = stats_of(x)
    s.save(tmp_path / "real.npz")
    loaded = FeatureStats.load(tmp_path / "real.npz")
    for a, b in zip(s.mean_cov(), loaded.mean_cov()):
        np.testing.assert_array_equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fvd_from_stats(s, loaded) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats(5).update(np.full((2, 5), np.nan))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
