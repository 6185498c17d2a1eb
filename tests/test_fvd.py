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


def test_identical_sets_give_zero_and_rank_deficient_sets_give_the_right_value():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 400)).astype(np.float32)  # fewer samples than dimensions
    s = stats_of(x)
    assert frechet_distance(*s.mean_cov(), *s.mean_cov()) == pytest.approx(0.0, abs=1e-9)
    for seed in range(5):
        y = np.random.default_rng(seed + 10).standard_normal((64, 400)).astype(np.float32) * 1e-3
        with pytest.warns(UserWarning, match="rank-deficient"):
            value = fvd_from_stats(s, stats_of(y))
        assert np.isfinite(value) and value >= 0
        # The value itself, by another route: tr sqrt(S1 S2) from the (real, non-negative)
        # eigenvalues of the non-symmetric product, in float64.
        (m1, c1), (m2, c2) = s.mean_cov(), stats_of(y).mean_cov()
        eigenvalues = np.linalg.eigvals(c1 @ c2).real
        root_trace = np.sum(np.sqrt(np.clip(eigenvalues, 0, None)))
        expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * root_trace
        assert value == pytest.approx(expected, rel=1e-6)


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
