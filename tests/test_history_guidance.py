"""History guidance: the scan sampler equals a two-call (three with class guidance) reference
loop written here step by step; s = 1 is the conditional prediction, s = 0 is off; one batched
model call; no effect without context frames; the VideoSampler's options, warning and single
compilation."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.config import checks
from fvdm_jax.config.load import load_config
from fvdm_jax.diffusion import Schedule, tasks
from fvdm_jax.diffusion.guidance import (
    HistoryGuidance,
    HistoryInput,
    guided_model_fn,
    history_noise,
)
from fvdm_jax.diffusion.samplers import cfg_model_fn, make_sampler, sample
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.dit import DiT, model_from_config
from fvdm_jax.sampling.sampler import VideoSampler, validate_sample_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
B, N, HW, C = 2, 4, 8, 4
NUM_CLASSES = 3
SCHEDULE = Schedule()
ABAR = SCHEDULE.alphas_cumprod


def random_params(model, with_labels: bool, seed: int = 0):
    """Every parameter random (adaLN and final layers start at zero otherwise), O(1) outputs."""
    labels = jnp.zeros((1,), jnp.int32) if with_labels else None
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, N, HW, HW, C)),
                            jnp.zeros((1, N)), labels)
    rs = np.random.RandomState(seed)

    def randomize(leaf):
        std = 1.0 / np.sqrt(leaf.shape[-2]) if leaf.ndim >= 2 else 0.05
        return jnp.asarray(rs.normal(0.0, std, leaf.shape), leaf.dtype)

    return jax.tree.map(randomize, shapes)


@pytest.fixture(scope="module")
def tiny():
    model = DiT(input_size=HW, patch_size=2, in_channels=C, hidden_size=32, depth=2,
                num_heads=2, num_frames=N, num_classes=NUM_CLASSES)
    params = random_params(model, True)
    apply = jax.jit(lambda x, t, y: model.apply(params, x, t, y))
    return model, params, apply


# --- the reference: separate model calls and a scalar-table DDIM step, in float64 ------------


def ddim_ref(x, eps, tau, tau_next):
    """DDIM (eta 0) per frame from the float64 alpha_bar table; tau_next -1 is clean."""
    a = ABAR[np.rint(tau).astype(int)][..., None, None, None]
    nxt = np.rint(tau_next).astype(int)
    a_next = np.where(nxt < 0, 1.0, ABAR[np.maximum(nxt, 0)])[..., None, None, None]
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    return np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps


def reference_loop(call, x_T, taus, nexts, cond, rng, *, scale, level, cfg_scale=None):
    """Every step: c at the context as the policy shows it (m = 0: clean), u_h with the context
    at `level`, u_y with the null class (cfg_scale given); guided eps on the generated frames."""
    mask = np.asarray(cond.mask)[..., None, None, None]
    values = np.asarray(cond.values, np.float64)
    x = np.where(mask, values, np.asarray(x_T, np.float64))
    trajectory = []
    for i in range(taus.shape[0]):
        tau, nxt = taus[i], nexts[i]
        x_in = np.where(mask, values, x) if cond.policy == "hold" else x
        c = call(x_in, tau, "label")
        z = np.asarray(history_noise(rng, i, x.shape), np.float64)
        x_h = np.where(mask, np.sqrt(ABAR[level]) * values + np.sqrt(1 - ABAR[level]) * z, x_in)
        u_h = call(x_h, np.where(np.asarray(cond.mask), float(level), tau), "label")
        eps = c
        if cfg_scale is not None:
            u_y = call(x_in, tau, "null")
            eps = u_y + cfg_scale * (c - u_y)
        eps = np.where(mask, eps, eps + (scale - 1.0) * (c - u_h))
        x = ddim_ref(x_in, eps, tau, nxt)
        if cond.policy == "hold":
            x = np.where(mask, values, x)
        trajectory.append(x)
    return np.stack(trajectory)


def caller(apply, labels):
    def call(x, tau, which):
        y = labels if which == "label" else np.full_like(labels, NUM_CLASSES)
        out = apply(jnp.asarray(x, jnp.float32), jnp.asarray(tau, jnp.float32), jnp.asarray(y))
        return np.asarray(out, np.float64)[..., :C]

    return call


def assert_close(name, ours, ref, rel=2e-5):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = float(np.max(np.abs(ours - ref)))
    tol = rel * max(1.0, float(np.max(np.abs(ref))))
    assert err <= tol, f"{name}: max abs error {err:.3e} > {tol:.3e}"


def inputs(task, policy):
    k1, k2 = jax.random.split(jax.random.key(3))
    x_T = jax.random.normal(k1, (B, N, HW, HW, C))
    clips = np.asarray(jax.random.normal(k2, (B, N, HW, HW, C)))
    if task == "i2v":
        built = tasks.i2v("10", clips[:, 0], N, policy=policy)
    elif task == "interpolate":
        built = tasks.interpolate("10", clips[:, [0, N - 1]], N, policy=policy)
    else:
        built = tasks.extend("10", clips, N, overlap=2, policy=policy)
    return x_T, built


CASES = [("i2v", "hold", "vanilla"), ("interpolate", "replace", "fractional"),
         ("extend", "hold", "fractional")]


@pytest.mark.parametrize("task,policy,mode", CASES, ids=["-".join(c) for c in CASES])
def test_history_guidance_equals_the_two_call_reference(tiny, task, policy, mode):
    model, params, apply = tiny
    labels = np.array([1, 2], np.int32)
    x_T, (taus, nexts, cond) = inputs(task, policy)
    guidance = HistoryGuidance(2.5, mode, 600 if mode == "fractional" else None)
    level = 999 if mode == "vanilla" else 600
    model_fn = lambda x, t: model.apply(params, x, t, jnp.asarray(labels))  # noqa: E731
    rng = jax.random.key(5)
    _, trajectory = sample(model_fn, SCHEDULE, x_T, taus, nexts, rng=rng, cond=cond,
                           history_guidance=guidance, return_trajectory=True)
    ref = reference_loop(caller(apply, labels), x_T, taus, nexts, cond, rng, scale=2.5,
                         level=level)
    for i in range(taus.shape[0]):
        assert_close(f"{task} step {i}", trajectory[i], ref[i])
    given = np.asarray(cond.mask)[0]
    if policy == "hold":
        np.testing.assert_array_equal(np.asarray(trajectory[-1])[:, given],
                                      np.asarray(cond.values)[:, given])
    # Guidance changed the generated frames: the reference with s = 1 (no guidance) differs.
    plain = reference_loop(caller(apply, labels), x_T, taus, nexts, cond, rng, scale=1.0,
                           level=level)
    assert np.abs(plain[-1] - np.asarray(trajectory[-1]))[:, ~given].max() > 1e-2


def mixing_model(x, tau):
    """An analytic model whose every frame depends on all frames and on its own tau."""
    context = jnp.mean(x, axis=1, keepdims=True)
    return jnp.tanh(x + 0.5 * context) * (1.0 + tau[..., None, None, None] / 1000.0)


def test_scale_one_is_conditional_zero_is_off_and_no_context_is_a_no_op(tiny):
    model, params, _ = tiny
    apply = lambda p, x, t: model.apply(p, x, t, jnp.ones((B,), jnp.int32))  # noqa: E731
    x_T, (taus, nexts, cond) = inputs("i2v", "hold")
    plain = make_sampler(apply, SCHEDULE)
    one = make_sampler(apply, SCHEDULE, history_guidance=HistoryGuidance(1.0))
    np.testing.assert_allclose(one(x_T, taus, nexts, None, cond, params),
                               plain(x_T, taus, nexts, None, cond, params), rtol=1e-5, atol=1e-5)

    # Off (0), and without context frames (generate), guidance changes nothing, bit for bit.
    def run(guidance, task_taus, task_nexts, task_cond):
        return np.asarray(sample(mixing_model, SCHEDULE, x_T, task_taus, task_nexts,
                                 cond=task_cond, history_guidance=guidance))

    want = run(None, taus, nexts, cond)
    np.testing.assert_array_equal(run(HistoryGuidance(0.0), taus, nexts, cond), want)
    assert np.abs(run(HistoryGuidance(3.0), taus, nexts, cond) - want).max() > 1e-2
    gen_taus, gen_nexts, _ = tasks.generate("10", B, N)
    np.testing.assert_array_equal(run(HistoryGuidance(3.0), gen_taus, gen_nexts, None),
                                  run(None, gen_taus, gen_nexts, None))
    with pytest.raises(ValueError, match="keeps clean"):
        r_taus, r_nexts, released = tasks.i2v("10", np.asarray(cond.values)[:, 0], N,
                                              policy="released")
        run(HistoryGuidance(2.0), r_taus, r_nexts, released)
    with pytest.raises(ValueError, match="needs noise_level"):
        HistoryGuidance(2.0, "fractional")
    with pytest.raises(ValueError, match=r"must lie in \[0, T - 1 = 999\]"):
        HistoryGuidance(2.0, "fractional", 1000).level(1000)


def test_composes_with_class_guidance_in_one_batched_call(tiny):
    """guided = u_y + s_y (c - u_y) + (s_h - 1) (c - u_h): the loop equals the three-call
    reference; s_h = 1 is classifier-free guidance alone; the model sees one (3B) batch."""
    model, params, apply = tiny
    labels = np.array([0, 2], np.int32)
    x_T, (taus, nexts, cond) = inputs("i2v", "hold")
    batches = []

    def counted(x, t, y):
        batches.append(x.shape[0])
        return model.apply(params, x, t, y)

    model_fn = guided_model_fn(counted, C, labels=labels, null_label=NUM_CLASSES, cfg_scale=4.0)
    rng = jax.random.key(9)
    _, trajectory = sample(model_fn, SCHEDULE, x_T, taus, nexts, rng=rng, cond=cond,
                           history_guidance=HistoryGuidance(2.0), return_trajectory=True)
    assert batches == [3 * B]  # traced once: c, u_y and u_h in one call
    ref = reference_loop(caller(apply, labels), x_T, taus, nexts, cond, rng, scale=2.0,
                         level=999, cfg_scale=4.0)
    for i in range(taus.shape[0]):
        assert_close(f"cfg + history step {i}", trajectory[i], ref[i])

    # s_h = 1: the official classifier-free guidance (cfg_model_fn) at any input.
    class_only = cfg_model_fn(lambda x, t, y: model.apply(params, x, t, y), labels, NUM_CLASSES,
                              4.0, C)
    x, tau = x_T, jnp.asarray(taus[3])
    x_h = x.at[:, 0].set(0.0)
    history = HistoryInput(x_h, tau.at[:, 0].set(999.0), cond.mask, 1.0)
    np.testing.assert_allclose(jax.jit(model_fn)(x, tau, history), jax.jit(class_only)(x, tau),
                               rtol=1e-5, atol=1e-5)


# --- the VideoSampler: options from the config, the p = 0 warning, one compilation ------------


def tiny_config(**sample_options):
    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.sample.num_steps = 4
    for key, value in sample_options.items():
        config.sample[key] = value
    return config


def test_video_sampler_history_guidance(caplog):
    config = tiny_config(history_guidance=3.0, history_guidance_mode="fractional",
                         history_noise_level=700, total_frames=6, overlap=2)
    model = model_from_config(config.model)
    params = random_params(model, False, seed=1)
    with caplog.at_level(logging.WARNING):
        VideoSampler.from_config(config, params)
    assert not [r for r in caplog.records if "ptss.p=0" in r.getMessage()]
    config.ptss.p = 0.0
    with caplog.at_level(logging.WARNING):
        sampler = VideoSampler.from_config(config, params)
    assert len([r for r in caplog.records if "ptss.p=0" in r.getMessage()]) == 1
    # Independent per-frame timesteps always mix levels, whatever ptss.p says: no warning.
    caplog.clear()
    config.ptss.scheme = "independent"
    with caplog.at_level(logging.WARNING):
        VideoSampler.from_config(config, params)
    assert not [r for r in caplog.records if "ptss.p=0" in r.getMessage()]
    config.ptss.scheme = "ptss"

    clips = np.asarray(jax.random.uniform(jax.random.key(2), (B, N, HW, HW, C), minval=-1,
                                          maxval=1))
    first = sampler.run("i2v", jax.random.key(0), model_inputs=clips)
    second = sampler.run("i2v", jax.random.key(1), model_inputs=clips)
    assert sampler.compilations() == 1
    np.testing.assert_array_equal(first[:, 0], second[:, 0])
    assert not np.allclose(first[:, 1:], second[:, 1:])
    config.sample.history_guidance = 0.0  # the same sampler without guidance
    unguided = VideoSampler.from_config(config, params).run("i2v", jax.random.key(0),
                                                            model_inputs=clips)
    np.testing.assert_array_equal(unguided[:, 0], first[:, 0])
    assert np.abs(unguided[:, 1:] - first[:, 1:]).max() > 0.05
    long = sampler.run("extend", jax.random.key(0), model_inputs=clips)
    assert long.shape[1] == 6 and np.isfinite(long).all()
    np.testing.assert_array_equal(long[:, :N], sampler.to_pixels(jnp.asarray(clips)))

    for bad, match in (
        (dict(history_guidance=2.0, history_guidance_mode="fractional"), "history_noise_level"),
        (dict(history_guidance=2.0, policy="released"), "keeps clean"),
        (dict(policy="released", noise_multiplier=0.2), "no meaning"),
        (dict(policy="released", task="progressive"), "progressive"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate_sample_config(tiny_config(**bad).sample, config.model)
    with pytest.raises(ConfigError, match="history_guidance_mode"):  # a single key: the schema's
        checks.check(tiny_config(history_guidance_mode="partial"), "sample")
    with pytest.raises(ConfigError, match="999"):
        VideoSampler.from_config(tiny_config(history_guidance=2.0, history_guidance_mode=
                                             "fractional", history_noise_level=1000), params)
