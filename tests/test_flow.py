"""Rectified flow with per-frame levels (fvdm_jax/diffusion/flow.py) against independent references:
numpy for the objective and the grids (Wan's and DiffSynth's formulas written out here), diffusers'
FlowMatchEulerDiscreteScheduler for the Euler step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.diffusion import flow
from fvdm_jax.diffusion.schemes import draw_frame_timesteps


def reference_train_sigmas(num_timesteps=1000, shift=5.0):
    """DiffSynth's FlowMatchScheduler training grid (sigma_max 1, sigma_min 0, extra_one_step),
    descending as it stores it: linspace(1, 0, T + 1)[:-1], shifted."""
    s = np.linspace(1.0, 0.0, num_timesteps + 1)[:-1]
    return shift * s / (1 + (shift - 1) * s)


def test_training_grid_is_diffsynths_in_ascending_order():
    schedule = flow.FlowSchedule(1000, 5.0)
    np.testing.assert_allclose(schedule.train_sigmas, reference_train_sigmas()[::-1], rtol=1e-6)
    assert schedule.train_sigmas[-1] == 1.0 and 0 < schedule.train_sigmas[0] < 0.01
    assert np.all(np.diff(schedule.train_sigmas) > 0)  # larger index = noisier, as for VP


def test_inference_grid_is_wans():
    """Wan 2.1's get_sampling_sigmas: linspace(1, 0, S + 1)[:S], shifted; the sampler ends at 0."""
    for steps, shift in ((10, 5.0), (30, 3.0)):
        s = np.linspace(1, 0, steps + 1)[:steps]
        want = np.append(shift * s / (1 + (shift - 1) * s), 0.0)
        np.testing.assert_allclose(flow.FlowSchedule(1000, shift).inference_sigmas(steps), want, rtol=1e-6)


def test_one_training_objective_equals_numpy():
    schedule = flow.FlowSchedule(1000, 5.0)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    index = np.array([[0, 500, 999], [10, 10, 10]])
    weights = np.array([[1.0, 2.0, 0.5], [1.0, 1.0, 1.0]], np.float32)

    def model_fn(x, t):  # any function of the input and the per-frame timestep
        return 0.3 * x + (t / 1000.0)[:, :, None, None, None]

    got = flow.flow_loss(model_fn, schedule, jnp.asarray(x0), jnp.asarray(index), jnp.asarray(noise),
                         weights=weights)
    sigma = reference_train_sigmas()[::-1][index][:, :, None, None, None]
    x_t = (1 - sigma) * x0 + sigma * noise
    v = 0.3 * x_t + sigma  # the model sees sigma * 1000 and divides by 1000
    per_frame = ((v - (noise - x0)) ** 2).mean(axis=(2, 3, 4))
    np.testing.assert_allclose(got["mse"], per_frame.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["loss"], (per_frame * weights).mean(), rtol=1e-5)


def test_euler_step_equals_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    scheduler.set_timesteps(8)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 3, 4, 4)).astype(np.float32)  # diffusers: (B, C, F, H, W)
    v = rng.standard_normal(x.shape).astype(np.float32)
    for i in (0, 3, 7):
        scheduler._step_index = i
        want = scheduler.step(torch.from_numpy(v), scheduler.timesteps[i], torch.from_numpy(x)).prev_sample
        sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        to_ours = lambda a: np.moveaxis(a, 1, -1)  # noqa: E731 - (B, F, H, W, C)
        got = flow.euler_step(jnp.asarray(to_ours(x)), jnp.asarray(to_ours(v)),
                              jnp.full((1, 3), sigma), jnp.full((1, 3), sigma_next))
        np.testing.assert_allclose(np.asarray(got), to_ours(want.numpy()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme,p", [("ptss", 0.0), ("ptss", 1.0), ("independent", 0.0), ("fopp", 0.0)])
def test_scheme_draws_give_per_frame_levels_on_the_grid(scheme, p):
    """Each scheme's integer draws become levels of the training grid: one level for all frames
    when PTSS's coin says so (p = 0), a level per frame otherwise; FoPP's never decrease."""
    schedule = flow.FlowSchedule(1000, 5.0)
    index = draw_frame_timesteps(jax.random.key(3), 64, 5, 1000, {"scheme": scheme, "p": p})
    sigmas = np.asarray(schedule.sigma(index))
    assert sigmas.shape == (64, 5) and np.isin(sigmas, schedule.train_sigmas).all()
    shared = (sigmas == sigmas[:, :1]).all(axis=1)
    if scheme == "ptss" and p == 0.0:
        assert shared.all()
    else:
        assert shared.mean() < 0.1
    if scheme == "fopp":
        assert (np.diff(sigmas, axis=1) >= 0).all()


def test_pusa_conditioning_keeps_the_frame_at_multiplier_zero():
    """i2v the Pusa way: the first latent frame at sigma * m; m = 0 leaves it exactly the given
    latent through every Euler step, m > 0 does not."""
    schedule = flow.FlowSchedule(1000, 5.0)
    rng = np.random.default_rng(2)
    clean = jnp.asarray(rng.standard_normal((2, 4, 3, 3, 2)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(clean.shape), jnp.float32)
    frames = np.zeros((2, 4), bool)
    frames[:, 0] = True

    def model_fn(x, t):
        return jnp.tanh(x) + (t / 1000.0)[:, :, None, None, None]

    for m in (0.0, 0.3):
        sigmas = flow.condition_sigmas(schedule.inference_sigmas(6), frames, m)
        assert sigmas.shape == (7, 2, 4) and (sigmas[:, :, 0] == m * sigmas[:, :, 1]).all()
        x = flow.start_latents(clean, frames, sigmas[0], noise)
        out = flow.euler_sample(model_fn, schedule, x, sigmas)
        same = np.array_equal(np.asarray(out[:, 0]), np.asarray(clean[:, 0]))
        assert same == (m == 0.0)
        assert not np.allclose(out[:, 1:], clean[:, 1:])


def test_text_guidance_is_one_batched_call():
    calls = []

    def model_fn(x, t, context):
        calls.append(x.shape[0])
        return x * context.mean(axis=(1, 2))[:, None, None, None, None]

    x = jnp.ones((2, 3, 2, 2, 1))
    t = jnp.zeros((2, 3))
    text, null = jnp.full((2, 4, 8), 2.0), jnp.zeros((2, 4, 8))
    out = flow.text_guided(model_fn, 3.0)(x, t, (text, null))
    assert calls == [4]
    np.testing.assert_allclose(out, 0 + 3.0 * (2.0 - 0.0) * np.ones(x.shape))
