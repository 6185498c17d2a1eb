"""Reverse diffusion with per-frame timesteps: single steps and whole `lax.scan` sampling loops.

Steps: DDIM, ancestral DDPM, and the continuous VP-SDE view (Euler-Maruyama for the reverse
SDE, Euler and Heun for the probability-flow ODE). Loops: `sample` / `make_sampler` run any
(S, B, N) schedule of per-frame timesteps, with optional conditioning frames ('hold' or
'replace'), and `cfg_model_fn` adds classifier-free guidance.

A step takes the model output at (x, tau) and moves every frame from tau to its own tau_next
(original-scale units; tau_next = -1 ends the frame clean). On the grid of a respaced schedule
these equal the official respaced DDIM / DDPM steps; a frame whose tau_next is -1 receives the
model's x_0 prediction and no noise, which is the official treatment of frames at t = 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from fvdm_jax.diffusion.gaussian import (
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_sample,
)
from fvdm_jax.diffusion.schedule import VPSDE, Schedule, extract


def ddim_step(
    schedule: Schedule,
    model_output,
    x,
    tau,
    tau_next,
    noise=None,
    *,
    eta: float = 0.0,
    clip_denoised: bool = False,
):
    """One DDIM step (Song et al. eq. 12) per frame. Returns (x_next, pred_xstart).

    As the official code, eps is re-derived from the (possibly clipped) x_0 prediction. `noise`
    is needed only when eta > 0.
    """
    channels = x.shape[-1]
    pred_xstart = predict_xstart_from_eps(schedule, x, tau, model_output[..., :channels])
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    eps = predict_eps_from_xstart(schedule, x, tau, pred_xstart)
    log_abar = extract(schedule.log_alpha_bar(tau), x.ndim)
    log_abar_next = extract(schedule.log_alpha_bar(tau_next), x.ndim)
    one_minus_abar_next = -jnp.expm1(log_abar_next)
    sigma = (
        eta
        * jnp.sqrt(one_minus_abar_next / -jnp.expm1(log_abar))
        * jnp.sqrt(jnp.maximum(-jnp.expm1(log_abar - log_abar_next), 0.0))
    )
    mean = pred_xstart * jnp.exp(0.5 * log_abar_next) + jnp.sqrt(
        jnp.maximum(one_minus_abar_next - sigma**2, 0.0)
    ) * eps
    if eta == 0.0 and noise is None:
        return mean, pred_xstart
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise of x's shape")
    gets_noise = extract(jnp.asarray(tau_next) >= 0, x.ndim)
    return mean + gets_noise * sigma * noise, pred_xstart


def ddpm_step(
    schedule: Schedule,
    model_output,
    x,
    tau,
    tau_next,
    noise,
    *,
    learn_sigma: bool = True,
    clip_denoised: bool = False,
):
    """One ancestral step: a sample of the model's p(x_tau_next | x_tau). Returns (x_next, x_0).

    Frames that end clean get the posterior mean and no noise. A frame with tau_next >= tau is
    not a reverse step and is returned unchanged.
    """
    out = p_mean_variance(
        schedule,
        model_output,
        x,
        tau,
        tau_next,
        learn_sigma=learn_sigma,
        clip_denoised=clip_denoised,
    )
    gets_noise = extract(jnp.asarray(tau_next) >= 0, x.ndim)
    sample = out["mean"] + gets_noise * jnp.exp(0.5 * out["log_variance"]) * noise
    moves = extract(jnp.asarray(tau_next) < jnp.asarray(tau), x.ndim)
    return jnp.where(moves, sample, x), out["pred_xstart"]


# ----------------------------------------------------------------------------------------------
# Whole sampling loops: one `lax.scan` over per-step, per-frame schedules.
#
# A schedule is data: `taus` (S, B, N) and `tau_next` (S, B, N) in original-scale units (tau_next
# = -1: the frame ends clean at that step). Every sampler below runs the same scan; only the step
# differs. Stochastic samplers draw their step-i noise as
#     jax.random.normal(jax.random.fold_in(rng, i), x.shape)
# and the noise used to show a 'hold' conditioning frame at tau > 0 as
#     jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), 1), x.shape)
# (`step_noise` / `conditioning_noise`), so a Python loop over the same steps reproduces a scan.

SAMPLERS = ("ddpm", "ddim", "sde_euler", "ode_euler", "ode_heun")
POLICIES = ("hold", "replace")


@struct.dataclass
class Conditioning:
    """Clean frames a sampler conditions on.

    mask (B, N) bool: the conditioning frames. values (B, N, H, W, C): their clean content (other
    frames are ignored). policy (static): 'hold' or 'replace'.

    'hold' (default; Diffusion Forcing / Pusa): a conditioning frame is reset to exactly `values`
    after every step, so the output equals the input bit-for-bit. The model is shown the frame at
    its schedule tau: `values` itself where tau <= 0, and q_sample(values, tau, fresh noise) where
    tau > 0 (Pusa's noise multiplier: the task gives the frame tau = m * t).
    'replace' (the paper's tau = 0 form, as the official long-video loop): the frame starts as
    `values` (noised to its first tau when that is > 0) and then follows its schedule like any
    other frame; at tau 0 / tau_next -1 each step sets it to the model's x_0 prediction, so the
    output is that prediction. (The released i2v scripts do neither: docs/sampling.md.)
    """

    mask: jnp.ndarray
    values: jnp.ndarray
    policy: str = struct.field(pytree_node=False, default="hold")

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"conditioning policy={self.policy!r} is not one of {POLICIES}")


def as_conditioning(cond) -> Conditioning | None:
    """None, a Conditioning, or a dict with mask, values and optional policy -> Conditioning."""
    if cond is None or isinstance(cond, Conditioning):
        return cond
    if isinstance(cond, dict):
        unknown = sorted(set(cond) - {"mask", "values", "policy"})
        if unknown:
            raise ValueError(f"conditioning keys {unknown} unknown; use mask, values, policy")
        return Conditioning(
            mask=jnp.asarray(cond["mask"], bool),
            values=jnp.asarray(cond["values"]),
            policy=cond.get("policy", "hold"),
        )
    raise ValueError(f"cond must be None, a Conditioning or a dict, got {type(cond).__name__}")


def step_noise(rng, step, shape):
    """The sampler noise of step `step` (see the section comment)."""
    return jax.random.normal(jax.random.fold_in(rng, step), shape, jnp.float32)


def conditioning_noise(rng, step, shape):
    """The noise that shows 'hold' conditioning frames at tau > 0 in step `step`."""
    return jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(rng, step), 1), shape, jnp.float32
    )


def show_conditioning(schedule: Schedule, x, tau, cond: Conditioning | None, noise):
    """The input the model sees: under 'hold', conditioning frames are `values` (tau <= 0) or
    q_sample(values, tau, noise) (tau > 0); everything else is x. 'replace' and None: x."""
    if cond is None or cond.policy != "hold":
        return x
    values = cond.values.astype(x.dtype)
    shown = jnp.where(
        extract(jnp.asarray(tau) > 0, x.ndim), q_sample(schedule, values, tau, noise), values
    )
    return jnp.where(extract(cond.mask, x.ndim), shown, x)


# --- the continuous view: reverse VP-SDE (Euler-Maruyama) and probability-flow ODE -----------
# Each frame moves from its own continuous time s = tau / (T-1) to s_next = tau_next / (T-1)
# (tau_next <= 0 -> s_next = 0). score = -eps / std(s). A frame whose s_next is 0 receives the
# x_0 prediction (x - std eps) / mean and no noise: the VP drift is singular at s = 0, and the
# x_0 prediction is where both the SDE and the ODE end. A frame at s = 0 (tau 0, e.g. a
# 'replace' conditioning frame) therefore stays exactly as it is.


def _vp_coefficients(sde: VPSDE, tau, ndim: int):
    s = sde.time_of_timestep(jnp.maximum(jnp.asarray(tau, jnp.float32), 0.0))
    log_abar = sde.log_alpha_bar(s)
    mean = jnp.exp(0.5 * log_abar)
    std = jnp.sqrt(-jnp.expm1(log_abar))
    return (extract(v, ndim) for v in (s, sde.beta(s), mean, std))


def _vp_drift(sde: VPSDE, model_output, x, tau, *, probability_flow, clip_denoised):
    """(dx/ds of the reverse SDE or the probability-flow ODE, x_0 prediction) at (x, tau)."""
    channels = x.shape[-1]
    eps = model_output[..., :channels]
    _, beta, mean, std = _vp_coefficients(sde, tau, x.ndim)
    pred_xstart = (x - std * eps) / mean
    safe_std = jnp.maximum(std, 1e-12)
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        eps = (x - mean * pred_xstart) / safe_std
    score_weight = 0.5 if probability_flow else 1.0
    # f(x, s) - w g(s)^2 score, with f = -beta x / 2, g^2 = beta, score = -eps / std.
    drift = -0.5 * beta * x + score_weight * beta * eps / safe_std
    return drift, pred_xstart


def _ends_clean(tau_next, ndim):
    return extract(jnp.asarray(tau_next) <= 0, ndim)


def _step_size(sde: VPSDE, tau, tau_next, ndim):
    s, *_ = _vp_coefficients(sde, tau, ndim)
    s_next, *_ = _vp_coefficients(sde, tau_next, ndim)
    return s_next - s  # <= 0 for a reverse step, 0 for a frame that does not move


def sde_euler_step(sde: VPSDE, model_output, x, tau, tau_next, noise, *, clip_denoised=False):
    """One Euler-Maruyama step of the reverse VP-SDE per frame. Returns (x_next, pred_xstart)."""
    drift, pred_xstart = _vp_drift(
        sde, model_output, x, tau, probability_flow=False, clip_denoised=clip_denoised
    )
    h = _step_size(sde, tau, tau_next, x.ndim)
    _, beta, _, _ = _vp_coefficients(sde, tau, x.ndim)
    x_next = x + h * drift + jnp.sqrt(beta * jnp.maximum(-h, 0.0)) * noise
    return jnp.where(_ends_clean(tau_next, x.ndim), pred_xstart, x_next), pred_xstart


def ode_euler_step(sde: VPSDE, model_output, x, tau, tau_next, *, clip_denoised=False):
    """One Euler step of the probability-flow ODE per frame. Returns (x_next, pred_xstart)."""
    drift, pred_xstart = _vp_drift(
        sde, model_output, x, tau, probability_flow=True, clip_denoised=clip_denoised
    )
    h = _step_size(sde, tau, tau_next, x.ndim)
    return jnp.where(_ends_clean(tau_next, x.ndim), pred_xstart, x + h * drift), pred_xstart


def ode_heun_step(
    sde: VPSDE, model_fn, model_output, x, tau, tau_next, *, clip_denoised=False, show=None
):
    """One Heun (2nd-order) step of the probability-flow ODE. Returns (x_next, pred_xstart).

    model_output is the model at (x, tau). The second evaluation is at (x_euler, tau_next); frames
    that end clean (tau_next <= 0) are shown there as their x_0 prediction at tau 0 and receive
    that prediction (no correction: the drift is singular at s = 0). `show(x, tau)` maps the
    second input to what the model sees (conditioning); identity when None.
    """
    drift, pred_xstart = _vp_drift(
        sde, model_output, x, tau, probability_flow=True, clip_denoised=clip_denoised
    )
    h = _step_size(sde, tau, tau_next, x.ndim)
    ends = _ends_clean(tau_next, x.ndim)
    x_euler = jnp.where(ends, pred_xstart, x + h * drift)
    tau_2 = jnp.maximum(jnp.asarray(tau_next, jnp.float32), 0.0)
    x_2 = x_euler if show is None else show(x_euler, tau_2)
    drift_2, _ = _vp_drift(
        sde, model_fn(x_2, tau_2), x_2, tau_2, probability_flow=True, clip_denoised=clip_denoised
    )
    return jnp.where(ends, pred_xstart, x + 0.5 * h * (drift + drift_2)), pred_xstart


def _check_schedule(x_T, taus, tau_next):
    if x_T.ndim != 5:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}; expected (B, N, H, W, C)")
    want = (taus.shape[0],) + tuple(x_T.shape[:2]) if taus.ndim == 3 else None
    if taus.ndim != 3 or tuple(taus.shape) != want:
        raise ValueError(
            f"taus has shape {tuple(taus.shape)}; expected (S, B, N) with (B, N) = "
            f"{tuple(x_T.shape[:2])} from x_T"
        )
    if tuple(tau_next.shape) != tuple(taus.shape):
        raise ValueError(
            f"tau_next has shape {tuple(tau_next.shape)}; it must match taus {tuple(taus.shape)}"
        )


def sample(
    model_fn: Callable,
    schedule: Schedule,
    x_T,
    taus,
    tau_next,
    *,
    sampler: str = "ddim",
    eta: float = 0.0,
    rng=None,
    cond=None,
    clip_denoised: bool = False,
    return_trajectory: bool = False,
):
    """Runs a whole per-frame schedule as one `lax.scan`. jit-friendly (see `make_sampler`).

    model_fn(x (B, N, H, W, C), tau (B, N) original-scale float32) -> (B, N, H, W, C or 2C): eps
    first; with 2C channels DDPM uses the learned variance. x_T (B, N, H, W, C); taus and tau_next
    (S, B, N), original scale, tau_next = -1 ends a frame clean. sampler: 'ddpm' (ancestral),
    'ddim' (eta), 'sde_euler' (reverse VP-SDE, Euler-Maruyama), 'ode_euler' / 'ode_heun'
    (probability-flow ODE); the last three need the linear schedule (the paper's VP-SDE, beta
    0.1 -> 20). rng: a PRNG key, required by 'ddpm', 'sde_euler' and 'ddim' with eta > 0 (noise
    of step i = `step_noise(rng, i, x.shape)`); when None, conditioning noise uses key 0.
    cond: a `Conditioning` (or dict) or None; before the first step conditioning frames are set
    to their values (noised to their first tau when that is > 0 under 'replace').
    Returns x_0 (B, N, H, W, C), or (x_0, trajectory (S, B, N, H, W, C)) with return_trajectory.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    stochastic = sampler in ("ddpm", "sde_euler") or (sampler == "ddim" and eta != 0.0)
    if stochastic and rng is None:
        raise ValueError(
            f"sampler={sampler!r} (eta={eta}) draws noise: pass rng=jax.random.key(...)"
        )
    sde = VPSDE.from_schedule(schedule) if sampler.startswith(("sde", "ode")) else None
    cond = as_conditioning(cond)
    x_T = jnp.asarray(x_T, jnp.float32)
    taus = jnp.asarray(taus, jnp.float32)
    tau_next = jnp.asarray(tau_next, jnp.float32)
    _check_schedule(x_T, taus, tau_next)
    if cond is not None and (
        tuple(cond.mask.shape) != tuple(x_T.shape[:2])
        or tuple(cond.values.shape) != tuple(x_T.shape)
    ):
        raise ValueError(
            f"cond mask {tuple(cond.mask.shape)} / values {tuple(cond.values.shape)} must be "
            f"{tuple(x_T.shape[:2])} / {tuple(x_T.shape)}"
        )
    key = jax.random.key(0) if rng is None else rng
    shape = x_T.shape

    x = x_T
    if cond is not None:
        mask = extract(cond.mask, x.ndim)
        values = cond.values.astype(x.dtype)
        if cond.policy == "replace":
            first = jnp.where(
                extract(taus[0] > 0, x.ndim),
                q_sample(schedule, values, taus[0], conditioning_noise(key, 0, shape)),
                values,
            )
            x = jnp.where(mask, first, x)
        else:
            x = jnp.where(mask, values, x)

    def body(x, inputs):
        i, tau, nxt = inputs
        zc = conditioning_noise(key, i, shape) if cond is not None else None
        show = functools.partial(show_conditioning, schedule, cond=cond, noise=zc)
        x_in = show(x, tau)
        out = model_fn(x_in, tau)
        if sampler == "ddim":
            noise = step_noise(key, i, shape) if eta != 0.0 else None
            x_new, _ = ddim_step(
                schedule, out, x_in, tau, nxt, noise, eta=eta, clip_denoised=clip_denoised
            )
        elif sampler == "ddpm":
            x_new, _ = ddpm_step(
                schedule,
                out,
                x_in,
                tau,
                nxt,
                step_noise(key, i, shape),
                learn_sigma=out.shape[-1] == 2 * shape[-1],
                clip_denoised=clip_denoised,
            )
        elif sampler == "sde_euler":
            x_new, _ = sde_euler_step(
                sde, out, x_in, tau, nxt, step_noise(key, i, shape), clip_denoised=clip_denoised
            )
        elif sampler == "ode_euler":
            x_new, _ = ode_euler_step(sde, out, x_in, tau, nxt, clip_denoised=clip_denoised)
        else:
            x_new, _ = ode_heun_step(
                sde, model_fn, out, x_in, tau, nxt, clip_denoised=clip_denoised, show=show
            )
        if cond is not None and cond.policy == "hold":
            x_new = jnp.where(mask, values, x_new)
        return x_new, (x_new if return_trajectory else None)

    steps = jnp.arange(taus.shape[0], dtype=jnp.uint32)
    x, trajectory = jax.lax.scan(body, x, (steps, taus, tau_next))
    return (x, trajectory) if return_trajectory else x


def make_sampler(
    model_fn: Callable,
    schedule: Schedule,
    *,
    sampler: str = "ddim",
    eta: float = 0.0,
    clip_denoised: bool = False,
    return_trajectory: bool = False,
):
    """A jitted `sample` with the static choices bound: fn(x_T, taus, tau_next, rng=None,
    cond=None, params=None). It compiles once per (shapes, conditioning policy) and is reused
    for every batch. With params, the model is called as model_fn(params, x, tau): pass large
    weights this way, so that they are arguments of the compiled program, not constants in it.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")

    def run(x_T, taus, tau_next, rng=None, cond=None, params=None):
        return sample(
            model_fn if params is None else functools.partial(model_fn, params),
            schedule,
            x_T,
            taus,
            tau_next,
            sampler=sampler,
            eta=eta,
            rng=rng,
            cond=as_conditioning(cond),
            clip_denoised=clip_denoised,
            return_trajectory=return_trajectory,
        )

    return jax.jit(run)


def cfg_model_fn(apply_fn: Callable, labels, null_label: int, scale: float, in_channels: int):
    """Classifier-free guidance as a model_fn(x, tau) for `sample` (official forward_with_cfg).

    apply_fn(x (2B, ...), tau (2B, N), labels (2B,)) -> (2B, N, H, W, C or 2C). The batch is
    doubled as [conditional; unconditional (null_label)]; the first in_channels output channels
    become uncond + scale * (cond - uncond), the remaining (variance) channels are the
    conditional half's. Returns (B, N, H, W, C or 2C).
    """
    labels = jnp.asarray(labels)

    def model_fn(x, tau):
        both_labels = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
        out = apply_fn(
            jnp.concatenate([x, x], axis=0), jnp.concatenate([tau, tau], axis=0), both_labels
        )
        cond_out, uncond_out = jnp.split(out, 2, axis=0)
        c, u = cond_out[..., :in_channels], uncond_out[..., :in_channels]
        return jnp.concatenate([u + scale * (c - u), cond_out[..., in_channels:]], axis=-1)

    return model_fn
