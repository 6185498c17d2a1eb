"""The continuous samplers run the VP-SDE of the trained discrete schedule: its marginals at
every integer tau are the schedule's, its rate integrates to them, and its probability-flow ODE
solved with more and more steps approaches DDIM's deterministic map (eta = 0) on an analytic
optimal denoiser, Heun faster than Euler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.diffusion import tasks
from fvdm_jax.diffusion.samplers import make_sampler
from fvdm_jax.diffusion.schedule import VPSDE, DiscreteVPSDE, Schedule, extract

SCHEDULES = {"linear": Schedule(), "cosine": Schedule(beta_schedule="cosine")}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_marginals_at_every_integer_tau_are_the_discrete_schedules(name):
    schedule = SCHEDULES[name]
    sde = DiscreteVPSDE(schedule)
    tau = np.arange(schedule.num_timesteps)
    abar = schedule.alphas_cumprod
    np.testing.assert_allclose(np.asarray(sde.marginal_std(tau), np.float64), np.sqrt(1 - abar),
                               rtol=2e-6)
    np.testing.assert_allclose(np.asarray(sde.marginal_mean_coeff(tau), np.float64),
                               np.sqrt(abar), rtol=2e-6)
    assert float(sde.marginal_std(-1.0)) == 0.0  # tau = -1 is clean

    # The SDE's rate gives these marginals: the variance of x_tau | x_0 solves
    # dv/dtau = beta(tau) (1 - v), v(-1) = 0. RK4 with 4 substeps per unit of tau, beta read
    # from the SDE inside each substep.
    h, v, at_integers = 0.25, 0.0, []
    midpoints = -1.0 + h * (np.arange(4 * schedule.num_timesteps) + 0.5)
    betas = np.asarray(sde.beta(midpoints), np.float64)  # constant on a substep (one cell)
    for k, beta in enumerate(betas):
        k1 = beta * (1 - v)
        k2 = beta * (1 - (v + 0.5 * h * k1))
        k3 = beta * (1 - (v + 0.5 * h * k2))
        k4 = beta * (1 - (v + h * k3))
        v += h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if k % 4 == 3:
            at_integers.append(v)
    np.testing.assert_allclose(at_integers, 1 - abar, rtol=1e-5)
    # Off the grid the marginals interpolate log alpha_bar linearly, monotone in tau.
    fine = np.asarray(sde.marginal_std(jnp.linspace(-1.0, schedule.num_timesteps - 1.0, 8001)))
    assert (np.diff(fine) >= 0).all()

    if name == "linear":  # the paper's continuous VP-SDE is not the trained process
        vp = VPSDE.from_schedule(schedule)
        ratio = vp.marginal_std(vp.time_of_timestep(1.0)) / float(sde.marginal_std(1.0))
        assert 0.69 < ratio < 0.72


# --- an analytic model: the exact eps of Gaussian data x_0 ~ N(mu, sd^2), per frame ------------

B, N, HW, C = 2, 3, 4, 2
MU = np.array([0.3, -0.5, 0.0], np.float32)[None, :, None, None, None]
SD = np.array([0.5, 1.0, 0.1], np.float32)[None, :, None, None, None]
SCHEDULE = SCHEDULES["linear"]


def optimal_eps(x, tau):
    """E[eps | x_tau] on the schedule's marginals: std (x - a mu) / (a^2 sd^2 + std^2)."""
    log_abar = extract(SCHEDULE.log_alpha_bar(tau), x.ndim)
    a, var = jnp.exp(0.5 * log_abar), -jnp.expm1(log_abar)
    return jnp.sqrt(var) * (x - a * MU) / (a**2 * SD**2 + var)


def exact_flow(x_T):
    """The probability-flow ODE keeps z = (x - a mu) / sqrt(a^2 sd^2 + std^2) (1-D Gaussian
    marginals); from tau = 999 to tau = 0 and then to x_0 by the denoiser at tau = 0, as every
    sampler's last step."""
    abar = SCHEDULE.alphas_cumprod
    a_T, a_0 = np.sqrt(abar[999]), np.sqrt(abar[0])
    z = (x_T - a_T * MU) / np.sqrt(a_T**2 * SD**2 + 1 - abar[999])
    return MU + a_0 * SD**2 * z / np.sqrt(a_0**2 * SD**2 + 1 - abar[0])


def run(sampler, steps, x_T):
    taus, nexts, _ = tasks.generate(steps, B, N)
    fn = make_sampler(optimal_eps, SCHEDULE, sampler=sampler)
    return np.asarray(fn(x_T, taus, nexts), np.float64)


def test_probability_flow_ode_approaches_the_ddim_map():
    """Both solve the same ODE (DDIM is its first-order exponential integrator): with S steps
    the ODE solvers' and DDIM's outputs meet within a tolerance that shrinks like 1 / S, and
    all approach the exact flow map (Euler and DDIM like 1 / S, Heun like 1 / S^2)."""
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (B, N, HW, HW, C)))
    exact = exact_flow(x_T.astype(np.float64))
    gaps, errors = {}, {}
    for steps in (25, 100, 400, 1000):
        out = {name: run(name, str(steps), x_T) for name in ("ddim", "ode_euler", "ode_heun")}
        for name in ("ode_euler", "ode_heun"):
            gaps[name, steps] = float(np.max(np.abs(out[name] - out["ddim"])))
            assert gaps[name, steps] <= 10.0 / steps, (name, steps, gaps[name, steps])
        for name, x0 in out.items():
            errors[name, steps] = float(np.max(np.abs(x0 - exact)))
        assert errors["ddim", steps] <= 6.0 / steps and errors["ode_euler", steps] <= 6.0 / steps
    assert gaps["ode_euler", 1000] < 1e-2 and gaps["ode_heun", 1000] < 6e-3
    for name in ("ddim", "ode_euler"):  # first order
        assert errors[name, 100] < errors[name, 25] / 3 and errors[name, 400] < errors[name, 100] / 3
    assert errors["ode_heun", 100] < errors["ode_heun", 25] / 8  # second order
    assert errors["ode_heun", 400] < 1e-3 and errors["ode_heun", 400] < errors["ode_euler", 400] / 10
