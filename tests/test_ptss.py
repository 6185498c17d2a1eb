"""Statistics of PTSS, the probabilistic timestep sampling strategy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.diffusion.ptss import sample_frame_timesteps

T, F = 1000, 4


def _draw(keys, batch, p, mode):
    fn = jax.jit(
        jax.vmap(lambda k: sample_frame_timesteps(k, batch, F, T, p, mode)), static_argnums=()
    )
    return np.asarray(fn(keys))  # (draws, B, F)


def _independent_rows(t):
    """Rows whose frames are not all equal (a truly independent row is all-equal w.p. 1e-9)."""
    return np.any(t != t[..., :1], axis=-1)


@pytest.mark.parametrize("mode", ["per_batch", "per_sample"])
def test_p0_shares_one_timestep_per_video(mode):
    t = _draw(jax.random.split(jax.random.key(0), 200), 8, 0.0, mode)
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
    assert not _independent_rows(t).any()
    # The shared timesteps are still spread over the whole range.
    assert t.min() < 50 and t.max() > T - 50


@pytest.mark.parametrize("mode", ["per_batch", "per_sample"])
def test_p1_draws_every_frame_independently(mode):
    t = _draw(jax.random.split(jax.random.key(1), 500), 8, 1.0, mode).reshape(-1, F)
    assert _independent_rows(t).all()
    # Uniform marginals: each tenth of [0, T) holds 10% of the draws (5-sigma binomial bound).
    n = t.size
    hist = np.bincount(t.reshape(-1) // (T // 10), minlength=10) / n
    assert np.all(np.abs(hist - 0.1) < 5 * np.sqrt(0.1 * 0.9 / n))
    # Frames are uncorrelated with each other.
    corr = np.corrcoef(t.T.astype(np.float64))
    off_diag = corr[~np.eye(F, dtype=bool)]
    assert np.all(np.abs(off_diag) < 5 / np.sqrt(t.shape[0]))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_per_sample_fraction_of_independent_rows_is_p(p):
    draws, batch = 400, 16
    t = _draw(jax.random.split(jax.random.key(2), draws), batch, p, "per_sample")
    rows = _independent_rows(t)
    n = rows.size
    assert abs(rows.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    # Coins differ within a batch: some batches mix shared and independent rows.
    assert np.any(rows.any(axis=1) & ~rows.all(axis=1))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_per_batch_one_coin_for_the_whole_batch(p):
    draws, batch = 4000, 4
    t = _draw(jax.random.split(jax.random.key(3), draws), batch, p, "per_batch")
    rows = _independent_rows(t)
    # Every batch is all-independent or all-shared: one coin per call.
    assert np.all(rows.all(axis=1) | ~rows.any(axis=1))
    frac = rows.all(axis=1).mean()
    assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / draws)


def test_traced_p_and_bad_arguments():
    fn = jax.jit(lambda k, p: sample_frame_timesteps(k, 4, F, T, p, "per_sample"))
    assert fn(jax.random.key(0), jnp.float32(0.0)).shape == (4, F)
    with pytest.raises(ValueError, match="ptss.mode"):
        sample_frame_timesteps(jax.random.key(0), 2, F, T, 0.2, "per_frame")
    with pytest.raises(ValueError, match="ptss.p"):
        sample_frame_timesteps(jax.random.key(0), 2, F, T, 1.5)
