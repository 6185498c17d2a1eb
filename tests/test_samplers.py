"""The scan samplers: equal to a Python loop step by step, to scalar DDIM, and to the official
DDIM-10 and image-to-video vectors; 'hold' conditioning is exact; one compilation per shape."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.convert.official import convert_state_dict, unwrap_state_dict
from fvdm_jax.diffusion import (
    Schedule,
    ddim_step,
    ddpm_step,
    q_sample,
    respaced_alphas_cumprod,
    space_timesteps,
    tasks,
)
from fvdm_jax.diffusion.samplers import (
    Conditioning,
    cfg_model_fn,
    conditioning_noise,
    make_sampler,
    sample,
    step_noise,
)
from fvdm_jax.diffusion.schedule import timestep_grid
from fvdm_jax.models.dit import DiT

VECTORS = os.path.join(os.path.dirname(__file__), "data", "fvdm_official_tiny.npz")
B, N, HW, C = 2, 4, 8, 4
SCHEDULE = Schedule()  # 1000-step linear: the paper's VP-SDE, beta 0.1 -> 20


def tiny_model():
    """A tiny DiT with every parameter random (adaLN and final layers init to zero otherwise),
    scaled 1/sqrt(fan_in) so that outputs stay O(1)."""
    model = DiT(
        input_size=HW, patch_size=2, in_channels=C, hidden_size=32, depth=2, num_heads=2,
        num_frames=N,
    )
    dummy = (jnp.zeros((1, N, HW, HW, C)), jnp.zeros((1, N)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), *dummy)  # randomized below
    rs = np.random.RandomState(0)

    def randomize(leaf):
        std = 1.0 / np.sqrt(leaf.shape[-2]) if leaf.ndim >= 2 else 0.05
        return jnp.asarray(rs.normal(0.0, std, leaf.shape), leaf.dtype)

    return model, jax.tree.map(randomize, shapes)


@pytest.fixture(scope="module")
def tiny():
    model, params = tiny_model()
    apply = lambda p, x, t: model.apply(p, x, t)  # noqa: E731
    return apply, params, jax.jit(apply)


def per_frame_schedule():
    """(S=10, B, N) float timesteps, every frame on its own (scaled, off-grid) DDIM-10 path."""
    t, t_next = timestep_grid("10")
    scale = np.array([[0.3, 1.0, 0.71, 0.45], [0.3, 0.93, 1.0, 0.2]], np.float32)
    taus = t[:, None, None] * scale
    nexts = np.where(t_next[:, None, None] < 0, -1.0, t_next[:, None, None] * scale)
    return taus.astype(np.float32), nexts.astype(np.float32)


def hold_cond(x0_values, multiplier_frames=(0,)):
    mask = np.zeros((B, N), bool)
    mask[:, list(multiplier_frames)] = True
    return Conditioning(mask=jnp.asarray(mask), values=jnp.asarray(x0_values), policy="hold")


# --- an independent Python-loop reference, continuous steps written in score form, float64 ---
# The continuous samplers run the VP-SDE whose -log alpha_bar is the discrete table, linear in
# tau between grid points, with steps taken in lambda = -log alpha_bar.

LOG_ABAR = np.concatenate([[0.0], np.log(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))])


def _vp(tau):
    tau = np.maximum(np.asarray(tau, np.float64), 0.0)
    log_abar = np.interp(tau, np.arange(-1, 1000), LOG_ABAR).reshape(tau.shape + (1, 1, 1))
    return log_abar, np.exp(0.5 * log_abar), np.sqrt(-np.expm1(log_abar))


def _continuous_ref_step(kind, model, x, tau, nxt, out, noise, show):
    x = np.asarray(x, np.float64)
    log_abar, mean, std = _vp(tau)
    log_abar_next, *_ = _vp(nxt)
    eps = np.asarray(out, np.float64)[..., :C]
    score = -eps / std
    x0 = (x + std**2 * score) / mean
    ends = (np.asarray(nxt) < 0).reshape(log_abar.shape)
    h = log_abar - log_abar_next  # d lambda <= 0
    weight = 1.0 if kind == "sde_euler" else 0.5
    drift = -0.5 * x - weight * score
    if kind == "sde_euler":
        x_new = x + h * drift + np.sqrt(-h) * np.asarray(noise)
    elif kind == "ode_euler":
        x_new = x + h * drift
    else:
        tau_2 = np.maximum(nxt, 0.0)
        x_e = np.where(ends, x0, x + h * drift).astype(np.float32)
        x_e = show(x_e, tau_2)
        _, _, std2 = _vp(tau_2)
        eps2 = np.asarray(model(x_e, jnp.asarray(tau_2, jnp.float32)), np.float64)[..., :C]
        drift2 = -0.5 * np.asarray(x_e, np.float64) + 0.5 * eps2 / std2
        x_new = x + 0.5 * h * (drift + drift2)
    return np.where(ends, x0, x_new).astype(np.float32)


def reference_loop(kind, model, x_T, taus, nexts, rng, cond=None, eta=0.0):
    """Every step in Python; noise from fold_in(rng, step) as the scan draws it."""
    x, trajectory = jnp.asarray(x_T), []
    if cond is not None:
        mask5 = jnp.asarray(cond.mask)[..., None, None, None]
        x = jnp.where(mask5, cond.values, x)
    for i in range(taus.shape[0]):
        tau, nxt = jnp.asarray(taus[i]), jnp.asarray(nexts[i])

        def show(z, t, i=i):
            if cond is None:
                return z
            t = jnp.asarray(t, jnp.float32)
            noised = q_sample(SCHEDULE, cond.values, t, conditioning_noise(rng, i, z.shape))
            shown = jnp.where((t > 0)[..., None, None, None], noised, cond.values)
            return jnp.where(mask5, shown, z)

        x_in = show(x, tau)
        out = model(x_in, tau)
        noise = step_noise(rng, i, x.shape)
        if kind == "ddim":
            x = ddim_step(SCHEDULE, out, x_in, tau, nxt, noise if eta else None, eta=eta)[0]
        elif kind == "ddpm":
            x = ddpm_step(SCHEDULE, out, x_in, tau, nxt, noise)[0]
        else:
            x = jnp.asarray(_continuous_ref_step(kind, model, x_in, tau, nxt, out, noise, show))
        if cond is not None:
            x = jnp.where(mask5, cond.values, x)
        trajectory.append(np.asarray(x))
    return np.stack(trajectory)


def assert_close(name, ours, ref, rel):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    err = float(np.max(np.abs(ours - ref)))
    tol = rel * max(1.0, float(np.max(np.abs(ref))))
    assert err <= tol, f"{name}: max abs error {err:.3e} > {tol:.3e}"


_SAMPLERS = {}


def traj_sampler(apply, sampler, eta=0.0):
    """One jitted trajectory sampler per (sampler, eta), shared by the tests of this module."""
    key = (sampler, eta)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = make_sampler(
            apply, SCHEDULE, sampler=sampler, eta=eta, return_trajectory=True
        )
    return _SAMPLERS[key]


CASES = [  # (sampler, eta, conditioning): conditioning None, "hold0" (m = 0) or "hold" (m > 0)
    ("ddpm", 0.0, "hold"),
    ("ddim", 0.0, None),
    ("ddim", 0.5, "hold0"),
    ("sde_euler", 0.0, "hold0"),
    ("ode_euler", 0.0, None),
    ("ode_heun", 0.0, "hold"),
]


@pytest.mark.parametrize(
    "sampler,eta,conditioning", CASES, ids=[f"{s}-{e}-{c}" for s, e, c in CASES]
)
def test_scan_equals_python_loop_step_by_step(tiny, sampler, eta, conditioning):
    apply, params, jitted = tiny
    taus, nexts = per_frame_schedule()
    k1, k2, rng = jax.random.split(jax.random.key(1), 3)
    x_T = jax.random.normal(k1, (B, N, HW, HW, C))
    cond = None
    if conditioning is not None:
        values = jax.random.normal(k2, x_T.shape)
        cond = hold_cond(values)
        if conditioning == "hold0":  # the task puts a clean frame at tau 0 / tau_next -1
            taus[:, :, 0], nexts[:, :, 0] = 0.0, -1.0
    x0, trajectory = traj_sampler(apply, sampler, eta)(x_T, taus, nexts, rng, cond, params)
    model = lambda x, t: jitted(params, x, t)  # noqa: E731
    ref = reference_loop(sampler, model, x_T, taus, nexts, rng, cond, eta)
    assert np.isfinite(ref).all()
    for i in range(taus.shape[0]):
        assert_close(f"{sampler} step {i}", trajectory[i], ref[i], 1e-5)
    np.testing.assert_array_equal(x0, trajectory[-1])
    if cond is not None:  # 'hold': conditioning frames are the inputs, bit for bit
        np.testing.assert_array_equal(np.asarray(x0)[:, 0], np.asarray(cond.values)[:, 0])
    else:  # every frame moved away from its start
        assert np.abs(np.asarray(x0) - np.asarray(x_T)).min(axis=(2, 3, 4)).max() > 0


def test_uniform_scan_ddim_is_scalar_ddim(tiny):
    """Equal per-frame timesteps: the scan reduces to ordinary DDIM on the respaced process."""
    apply, params, jitted = tiny
    taus, nexts, _ = tasks.generate("10", B, N)
    x_T = jax.random.normal(jax.random.key(3), (B, N, HW, HW, C))
    _, trajectory = traj_sampler(apply, "ddim")(x_T, taus, nexts, None, None, params)

    timestep_map = space_timesteps(1000, "10")
    abar = respaced_alphas_cumprod(SCHEDULE, timestep_map)
    x = np.asarray(x_T, np.float64)
    for step, index in enumerate(reversed(range(len(timestep_map)))):
        t = np.full((B, N), timestep_map[index], np.float32)
        eps = np.asarray(jitted(params, jnp.asarray(x, jnp.float32), t), np.float64)[..., :C]
        a, a_prev = abar[index], abar[index - 1] if index > 0 else 1.0
        pred_x0 = np.sqrt(1 / a) * x - np.sqrt(1 / a - 1) * eps
        x = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev) * eps
        assert_close(f"scalar DDIM step {step}", trajectory[step], x, 1e-5)


def test_one_compilation_for_several_batches(tiny):
    apply, params, _ = tiny
    chex.clear_trace_counter()
    # A second trace of the model (a retrace of the sampler) raises right where it happens.
    run = make_sampler(chex.assert_max_traces(apply, n=1), SCHEDULE, sampler="ddim")
    taus, nexts = per_frame_schedule()
    outs = []
    for seed in range(3):
        keys = jax.random.split(jax.random.key(10 + seed))
        values = jax.random.normal(keys[1], (B, N, HW, HW, C))
        cond = hold_cond(values, (0, N - 1))
        x_T = jax.random.normal(keys[0], values.shape)
        outs.append(np.asarray(run(x_T, taus + seed, nexts, None, cond, params)))
        ends = [0, N - 1]
        np.testing.assert_array_equal(outs[-1][:, ends], np.asarray(values)[:, ends])
    assert run._cache_size() == 1
    assert not np.allclose(outs[0], outs[1])


def test_sampler_errors(tiny):
    apply, params, _ = tiny
    model_fn = lambda x, t: apply(params, x, t)  # noqa: E731
    taus, nexts = per_frame_schedule()
    x = jnp.zeros((B, N, HW, HW, C))
    with pytest.raises(ValueError, match="sampler='euler'"):
        sample(model_fn, SCHEDULE, x, taus, nexts, sampler="euler")
    with pytest.raises(ValueError, match="pass rng"):
        sample(model_fn, SCHEDULE, x, taus, nexts, sampler="ddpm")
    with pytest.raises(ValueError, match="taus has shape"):
        sample(model_fn, SCHEDULE, x, taus[:, :1], nexts[:, :1])
    with pytest.raises(ValueError, match="tau_next has shape"):
        sample(model_fn, SCHEDULE, x, taus, nexts[:-1])
    with pytest.raises(ValueError, match="policy="):
        Conditioning(mask=jnp.zeros((B, N), bool), values=x, policy="keep")


# --- the official reference vectors, through the scan sampler ---------------------------------


def to_ours(a):
    return np.asarray(a).transpose(0, 1, 3, 4, 2)


@pytest.fixture(scope="module")
def official():
    with np.load(VECTORS, allow_pickle=False) as data:
        ref = {k: data[k] for k in data.files}
    cfg = json.loads(str(ref["config_json"]))

    def load(prefix, num_classes):
        model = DiT(
            input_size=cfg["input_size"], patch_size=cfg["patch_size"],
            in_channels=cfg["in_channels"], hidden_size=cfg["hidden_size"], depth=cfg["depth"],
            num_heads=cfg["num_heads"], num_frames=cfg["num_frames"], num_classes=num_classes,
            class_dropout_prob=cfg["class_dropout_prob"], learn_sigma=cfg["learn_sigma"],
        )
        sd = unwrap_state_dict({k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)})
        return model, convert_state_dict(sd, model)

    return ref, cfg, load


def assert_official(name, ours, ref):
    assert_close(name, ours, ref, 1e-4)


def test_official_ddim10_and_i2v_loops_through_scan(official):
    ref, cfg, load = official
    model, params = load("uncond_sd/", 0)
    run = make_sampler(lambda p, x, t: model.apply(p, x, t), SCHEDULE, sampler="ddim")
    noise = to_ours(ref["ddim_loop_noise"])
    batch, frames = noise.shape[:2]

    taus, nexts, cond = tasks.generate("10", batch, frames)
    out = run(noise, taus, nexts, params=params)
    assert_official("ddim_loop_out", out, to_ours(ref["ddim_loop_out"]))

    # i2v, the official 'replace' semantics: frame 0 starts as x0[:, 0] and is at tau 0 /
    # tau_next -1 every step (so it becomes the model's x_0 prediction).
    image = to_ours(ref["x0"])[:, 0]
    taus, nexts, cond = tasks.i2v("10", image, frames, policy="replace")
    assert (taus[:, :, 0] == 0).all() and (nexts[:, :, 0] == -1).all()
    out = run(noise, taus, nexts, cond=cond, params=params)
    assert_official("ddim_i2v_loop_out", out, to_ours(ref["ddim_i2v_loop_out"]))


def test_cfg_model_fn_is_official_forward_with_cfg(official):
    ref, cfg, load = official
    model, params = load("cond_sd/", cfg["num_classes"])
    batch = int(cfg["batch"])
    model_fn = cfg_model_fn(
        lambda x, t, y: model.apply(params, x, t, y),
        ref["y"], cfg["num_classes"], cfg["cfg_scale"], cfg["in_channels"],
    )
    out = jax.jit(model_fn)(to_ours(ref["x0"]), jnp.asarray(ref["t"], jnp.float32))
    assert_official("model_cfg_out (conditional half)", out, to_ours(ref["model_cfg_out"])[:batch])


@pytest.mark.parametrize("task", ["i2v", "interpolate"])
def test_released_policy_is_the_released_scripts_loop(tiny, task):
    """'released': the clean latents are written into x_T at the given frames, then the ordinary
    DDIM loop runs with every frame at the same t; a scalar-DDIM loop written here reproduces it
    step by step, and the model overwrites the given frames."""
    apply, params, jitted = tiny
    k1, k2 = jax.random.split(jax.random.key(7))
    x_T = np.asarray(jax.random.normal(k1, (B, N, HW, HW, C)))
    clean = np.asarray(jax.random.normal(k2, (B, 2, HW, HW, C)))
    if task == "i2v":
        taus, nexts, cond = tasks.i2v("10", clean[:, 0], N, policy="released")
        given, values = [0], clean[:, :1]
    else:
        taus, nexts, cond = tasks.interpolate("10", clean, N, policy="released")
        given, values = [0, N - 1], clean
    t, t_next = timestep_grid("10")
    np.testing.assert_array_equal(taus, np.broadcast_to(t[:, None, None], taus.shape))
    np.testing.assert_array_equal(nexts, np.broadcast_to(t_next[:, None, None], nexts.shape))
    _, trajectory = traj_sampler(apply, "ddim")(x_T, taus, nexts, None, cond, params)

    timestep_map = space_timesteps(1000, "10")
    abar = respaced_alphas_cumprod(SCHEDULE, timestep_map)
    x = x_T.astype(np.float64)
    x[:, given] = values  # sample_video_i2v.py: z[:, 0] = x[:, 0] (and z[:, -1] for interpolation)
    for step, index in enumerate(reversed(range(len(timestep_map)))):
        tau = np.full((B, N), timestep_map[index], np.float32)
        eps = np.asarray(jitted(params, jnp.asarray(x, jnp.float32), tau), np.float64)[..., :C]
        a, a_prev = abar[index], abar[index - 1] if index > 0 else 1.0
        pred_x0 = np.sqrt(1 / a) * x - np.sqrt(1 / a - 1) * eps
        x = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev) * eps
        assert_close(f"released step {step}", trajectory[step], x, 1e-5)
    out = np.asarray(trajectory[-1])
    assert np.abs(out[:, given] - values).min(axis=(2, 3, 4)).min() > 1e-3  # overwritten
    with pytest.raises(ValueError, match="no meaning under policy 'released'"):
        tasks.i2v("10", clean[:, 0], N, policy="released", noise_multiplier=0.2)
    with pytest.raises(ValueError, match="released"):
        tasks.progressive("10", N, image=clean[:, 0], policy="released")
