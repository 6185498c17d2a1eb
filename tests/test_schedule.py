"""Schedules, respacing, the per-frame gathers, and the continuous VP-SDE view."""

import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.diffusion.schedule import (
    VPSDE,
    Schedule,
    make_betas,
    respaced_alphas_cumprod,
    space_timesteps,
    step_pairs,
)


def test_linear_schedule_matches_ddpm():
    s = Schedule()
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    # 1000/T scaling keeps the same continuous process for other T.
    np.testing.assert_allclose(make_betas("linear", 250)[[0, -1]], [4e-4, 0.08])


def test_cosine_schedule():
    betas = make_betas("cosine", 1000)
    assert betas.shape == (1000,) and np.all(np.diff(betas[:-1]) >= -1e-12) and betas.max() <= 0.999
    abar = np.cumprod(1 - betas)
    assert abar[0] > 0.9999 and abar[-1] < 1e-4


def test_bad_schedule_config():
    with pytest.raises(ValueError, match="beta_schedule"):
        Schedule(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="unknown diffusion config keys"):
        Schedule.from_config({"num_timesteps": 1000, "beta_sched": "linear"})


def test_gather_is_exact_on_grid_and_interpolates_between():
    s = Schedule()
    t = np.array([[0, 1, 500, 999]])
    np.testing.assert_allclose(
        np.exp(np.asarray(s.log_alpha_bar(t), np.float64)), s.alphas_cumprod[t], rtol=1e-6
    )
    assert float(s.log_alpha_bar(-1)) == 0.0  # clean
    mid = float(s.log_alpha_bar(499.5))
    lo, hi = np.log(s.alphas_cumprod[[499, 500]])
    assert mid == pytest.approx((lo + hi) / 2, rel=1e-6)
    # Monotone in tau, also off-grid.
    taus = jnp.linspace(-1, 999, 4001)
    assert np.all(np.diff(np.asarray(s.log_alpha_bar(taus))) <= 0)


def test_respacing_section_counts_and_ddim():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    two = space_timesteps(1000, "10,20")
    assert len(two) == 30 and max(t for t in two if t < 500) <= 499 and min(t for t in two if t >= 500) == 500
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "20")
    with pytest.raises(ValueError, match="ddim"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="section-count"):
        space_timesteps(1000, "fast")


def test_respaced_cumprod_equals_kept_alphas_cumprod():
    s = Schedule()
    kept = space_timesteps(1000, "50")
    np.testing.assert_allclose(respaced_alphas_cumprod(s, kept), s.alphas_cumprod[kept], rtol=1e-12)
    taus, nexts = step_pairs(kept)
    assert taus[0] == 999 and nexts[-1] == -1 and np.all(taus[1:] == nexts[:-1])


def test_vpsde_discretization_equals_discrete_betas():
    s = Schedule()
    sde = VPSDE.from_schedule(s)
    assert (sde.beta_min, sde.beta_max) == pytest.approx((0.1, 20.0))
    assert np.max(np.abs(sde.discrete_betas() - s.betas)) < 1e-12
    # The continuous log alpha_bar tracks the discrete cumulative product.
    s_cont = sde.time_of_timestep(np.arange(1000, dtype=np.float64))
    gap = np.abs(sde.log_alpha_bar(s_cont) - np.log(s.alphas_cumprod))
    assert gap.max() < 0.07
    assert sde.timestep_of_time(sde.time_of_timestep(123.0)) == pytest.approx(123.0)
    # Marginals: mean^2 + std^2 = 1 (variance preserving), in numpy and jax.
    for xs in (np.linspace(0, 1, 11), jnp.linspace(0, 1, 11)):
        np.testing.assert_allclose(sde.marginal_mean_coeff(xs) ** 2 + sde.marginal_std(xs) ** 2, 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="linear"):
        VPSDE.from_schedule(Schedule(beta_schedule="cosine"))
