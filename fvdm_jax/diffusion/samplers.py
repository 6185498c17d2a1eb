"""Reverse diffusion with per-frame timesteps: single steps and whole `lax.scan` sampling loops.

Steps: DDIM, ancestral DDPM, and the continuous view (`DiscreteVPSDE`: Euler-Maruyama for the
reverse SDE, Euler and Heun for the probability-flow ODE). Loops: `sample` / `make_sampler` run
any (S, B, N) schedule of per-frame timesteps, with optional conditioning frames ('hold',
'replace' or 'released') and history guidance; fvdm_jax/diffusion/guidance.py holds the guided
model calls (classifier-free and history guidance).

A step takes the model output at (x, tau) and moves every frame from tau to its own tau_next
(original-scale units; tau_next = -1 ends the frame clean). On the grid of a respaced schedule
these equal the official respaced DDIM / DDPM steps; a frame whose tau_next is -1 receives the
model's x_0 prediction and no noise, which is the official treatment of frames at t = 0.
"""

from __future__ import annotations

import functools
import inspect
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
from fvdm_jax.diffusion.guidance import (
    HistoryGuidance,
    HistoryInput,
    combine,
    history_free_input,
    history_noise,
)
from fvdm_jax.diffusion.guidance import cfg_model_fn as cfg_model_fn  # where it always was
from fvdm_jax.diffusion.schedule import Schedule, extract


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

    Frames that end clean get the posterior mean (their x_0 prediction) and no noise, whatever
    the variance output is (even one whose variance overflows). A frame with tau_next >= tau is
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
    noised = out["mean"] + jnp.exp(0.5 * out["log_variance"]) * noise
    sample = jnp.where(gets_noise, noised, out["mean"])
    moves = extract(jnp.asarray(tau_next) < jnp.asarray(tau), x.ndim)
    return jnp.where(moves, sample, x), out["pred_xstart"]


# ----------------------------------------------------------------------------------------------
# Whole sampling loops: one `lax.scan` over per-step, per-frame schedules.
#
# A schedule is data: `taus` (S, B, N) and `tau_next` (S, B, N) in original-scale units (tau_next
# = -1: the frame ends clean at that step). Every sampler below runs the same scan; only the step
# differs. Stochastic samplers draw their step-i noise as
#     jax.random.normal(jax.random.fold_in(rng, i), x.shape)
# the noise used to show a 'hold' conditioning frame at tau > 0 as
#     jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), 1), x.shape)
# and history guidance's noise for the context at tau_h with index 2 in place of 1
# (`step_noise` / `conditioning_noise` / `guidance.history_noise`), so a Python loop over the
# same steps reproduces a scan.

SAMPLERS = ("ddpm", "ddim", "sde_euler", "ode_euler", "ode_heun")
POLICIES = ("hold", "replace", "released")


@struct.dataclass
class Conditioning:
    """Clean frames a sampler conditions on.

    mask (B, N) bool: the conditioning frames. values (B, N, H, W, C): their clean content (other
    frames are ignored). policy (static): 'hold', 'replace' or 'released'.

    'hold' (default; Diffusion Forcing / Pusa): a conditioning frame is reset to exactly `values`
    after every step, so the output equals the input bit-for-bit. The model is shown the frame at
    its schedule tau: `values` itself where tau <= 0, and q_sample(values, tau, fresh noise) where
    tau > 0 (Pusa's noise multiplier: the task gives the frame tau = m * t).
    'replace' (the paper's tau = 0 form, as the official long-video loop): the frame starts as
    `values` (noised to its first tau when that is > 0) and then follows its schedule like any
    other frame; at tau 0 / tau_next -1 each step sets it to the model's x_0 prediction, so the
    output is that prediction.
    'released' (the released i2v / interpolation scripts): `values` are written into x_T and the
    frame is then an ordinary frame; the tasks label it like the others (tau = t every step), so
    the model overwrites it. docs/sampling.md says which form produced which official number.
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
    q_sample(values, tau, noise) (tau > 0); everything else is x. Other policies and None: x."""
    if cond is None or cond.policy != "hold":
        return x
    values = cond.values.astype(x.dtype)
    shown = jnp.where(
        extract(jnp.asarray(tau) > 0, x.ndim), q_sample(schedule, values, tau, noise), values
    )
    return jnp.where(extract(cond.mask, x.ndim), shown, x)


# --- the continuous view: reverse SDE (Euler-Maruyama) and probability-flow ODE ---------------
# The process is `DiscreteVPSDE`: the VP-SDE whose integrated rate lambda(tau) = -log alpha_bar
# (tau) is the trained schedule's, so its marginals are the network's training marginals. The
# steps are taken in lambda: a frame moves by h = lambda(tau_next) - lambda(tau) <= 0 (exact from
# the table, like a DDIM step's coefficients), with dx/dlambda = -x / 2 + w eps / std (w = 1 for
# the reverse SDE, whose noise is sqrt(-h) N(0, 1); w = 1/2 for the ODE); score = -eps / std.
# A frame whose tau_next is -1 receives the x_0 prediction (x - std eps) / mean and no noise:
# the drift is singular at lambda = 0, and x_0 is where both the SDE and the ODE end (and what
# DDIM gives there). A frame with tau_next = tau (waiting, finished) has h = 0 and stays exact.


def _vp_drift(schedule: Schedule, model_output, x, tau, *, probability_flow, clip_denoised):
    """(dx / dlambda of the reverse SDE or the probability-flow ODE, x_0 prediction)."""
    eps = model_output[..., : x.shape[-1]]
    log_abar = extract(schedule.log_alpha_bar(jnp.maximum(jnp.asarray(tau, jnp.float32), 0.0)),
                       x.ndim)
    mean, std = jnp.exp(0.5 * log_abar), jnp.sqrt(-jnp.expm1(log_abar))  # std >= sqrt(beta_0)
    pred_xstart = (x - std * eps) / mean
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        eps = (x - mean * pred_xstart) / std
    score_weight = 0.5 if probability_flow else 1.0
    return -0.5 * x + score_weight * eps / std, pred_xstart


def _ends_clean(tau_next, ndim):
    return extract(jnp.asarray(tau_next) < 0, ndim)


def _lambda_step(schedule: Schedule, tau, tau_next, ndim):
    """lambda(tau_next) - lambda(tau) = log alpha_bar(tau) - log alpha_bar(tau_next): <= 0 for a
    reverse step, 0 for a frame that does not move (tau_next -1 is handled by `_ends_clean`)."""
    def log_abar(t):
        return schedule.log_alpha_bar(jnp.maximum(jnp.asarray(t, jnp.float32), 0.0))

    return extract(log_abar(tau) - log_abar(tau_next), ndim)


def sde_euler_step(schedule: Schedule, model_output, x, tau, tau_next, noise, *,
                   clip_denoised=False):
    """One Euler-Maruyama step of the reverse SDE per frame. Returns (x_next, pred_xstart)."""
    drift, pred_xstart = _vp_drift(
        schedule, model_output, x, tau, probability_flow=False, clip_denoised=clip_denoised
    )
    h = _lambda_step(schedule, tau, tau_next, x.ndim)
    x_next = x + h * drift + jnp.sqrt(jnp.maximum(-h, 0.0)) * noise
    return jnp.where(_ends_clean(tau_next, x.ndim), pred_xstart, x_next), pred_xstart


def ode_euler_step(schedule: Schedule, model_output, x, tau, tau_next, *, clip_denoised=False):
    """One Euler step of the probability-flow ODE per frame. Returns (x_next, pred_xstart)."""
    drift, pred_xstart = _vp_drift(
        schedule, model_output, x, tau, probability_flow=True, clip_denoised=clip_denoised
    )
    h = _lambda_step(schedule, tau, tau_next, x.ndim)
    return jnp.where(_ends_clean(tau_next, x.ndim), pred_xstart, x + h * drift), pred_xstart


def ode_heun_step(schedule: Schedule, evaluate, model_output, x, tau, tau_next, *,
                  clip_denoised=False):
    """One Heun (2nd-order) step of the probability-flow ODE. Returns (x_next, pred_xstart).

    model_output is the model at (x, tau). The second evaluation is at (x_euler, tau_next);
    frames that end clean (tau_next = -1) receive their x_0 prediction (no correction: the drift
    is singular there). evaluate(x, tau) -> (the input the model saw, its output): the model
    call with conditioning and guidance, e.g. `lambda x, t: (x, model_fn(x, t))`.
    """
    drift, pred_xstart = _vp_drift(
        schedule, model_output, x, tau, probability_flow=True, clip_denoised=clip_denoised
    )
    h = _lambda_step(schedule, tau, tau_next, x.ndim)
    ends = _ends_clean(tau_next, x.ndim)
    x_euler = jnp.where(ends, pred_xstart, x + h * drift)
    tau_2 = jnp.maximum(jnp.asarray(tau_next, jnp.float32), 0.0)
    x_2, out_2 = evaluate(x_euler, tau_2)
    drift_2, _ = _vp_drift(
        schedule, out_2, x_2, tau_2, probability_flow=True, clip_denoised=clip_denoised
    )
    return jnp.where(ends, pred_xstart, x + 0.5 * h * (drift + drift_2)), pred_xstart


def _check_inputs(x_T, taus, tau_next, cond):
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
    if cond is not None and (
        tuple(cond.mask.shape) != tuple(x_T.shape[:2])
        or tuple(cond.values.shape) != tuple(x_T.shape)
    ):
        raise ValueError(
            f"cond mask {tuple(cond.mask.shape)} / values {tuple(cond.values.shape)} must be "
            f"{tuple(x_T.shape[:2])} / {tuple(x_T.shape)}"
        )


def _two_calls(model_fn, channels):
    """History guidance for a model_fn(x, tau) that knows nothing of it: a second call (it may
    hold per-example state, e.g. labels of batch B, so the batch is not doubled)."""
    def guided(x, tau, history: HistoryInput):
        return combine(model_fn(x, tau), channels, history_free=model_fn(history.x, history.tau),
                       history=history)

    return guided


def _takes_history(model_fn) -> bool:
    try:
        return "history" in inspect.signature(model_fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


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
    history_guidance: HistoryGuidance | None = None,
    return_trajectory: bool = False,
):
    """Runs a whole per-frame schedule as one `lax.scan`. jit-friendly (see `make_sampler`).

    model_fn(x (B, N, H, W, C), tau (B, N) original-scale float32) -> (B, N, H, W, C or 2C): eps
    first; with 2C channels DDPM uses the learned variance. x_T (B, N, H, W, C); taus and tau_next
    (S, B, N), original scale, tau_next = -1 ends a frame clean. sampler: 'ddpm' (ancestral),
    'ddim' (eta), 'sde_euler' (reverse SDE, Euler-Maruyama), 'ode_euler' / 'ode_heun'
    (probability-flow ODE), the last three on `DiscreteVPSDE`. rng: a PRNG key, required by
    'ddpm', 'sde_euler' and 'ddim' with eta > 0 (noise of step i = `step_noise(rng, i,
    x.shape)`); when None, conditioning and guidance noise use key 0.
    cond: a `Conditioning` (or dict) or None; before the first step conditioning frames are set
    to their values (noised to their first tau when that is > 0 under 'replace').
    history_guidance: a `HistoryGuidance` (guidance.py); active only with conditioning under
    'hold' or 'replace' (without conditioning frames it does nothing). A model_fn with a
    `history` keyword (`guidance.guided_model_fn`) receives the history-free input and guides
    itself (with class guidance in one batched call); any other is called twice, at x and x_h.
    Returns x_0 (B, N, H, W, C), or (x_0, trajectory (S, B, N, H, W, C)) with return_trajectory.
    """
    _check_sampler(sampler, eta, rng)
    cond = as_conditioning(cond)
    x_T, taus, tau_next = (jnp.asarray(a, jnp.float32) for a in (x_T, taus, tau_next))
    _check_inputs(x_T, taus, tau_next, cond)
    guidance = history_guidance if _history_guiding(history_guidance, cond) else None
    key = jax.random.key(0) if rng is None else rng
    shape = x_T.shape
    evaluator = _evaluator(model_fn, schedule, cond, guidance, key, shape)
    step = functools.partial(_step, sampler, schedule, key, shape, eta=eta, clip_denoised=clip_denoised)
    x = _initial_state(schedule, x_T, taus[0], cond, key)

    def body(x, inputs):
        i, tau, nxt = inputs
        evaluate = evaluator(i)
        x_in, out = evaluate(x, tau)
        x_new = step(i, evaluate, out, x_in, tau, nxt)
        if cond is not None and cond.policy == "hold":
            x_new = jnp.where(extract(cond.mask, x.ndim), cond.values.astype(x.dtype), x_new)
        return x_new, (x_new if return_trajectory else None)

    steps = jnp.arange(taus.shape[0], dtype=jnp.uint32)
    x, trajectory = jax.lax.scan(body, x, (steps, taus, tau_next))
    return (x, trajectory) if return_trajectory else x


def _check_sampler(sampler, eta, rng):
    """Raises a ValueError for an unknown sampler, or a stochastic one without an rng."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    stochastic = sampler in ("ddpm", "sde_euler") or (sampler == "ddim" and eta != 0.0)
    if stochastic and rng is None:
        raise ValueError(
            f"sampler={sampler!r} (eta={eta}) draws noise: pass rng=jax.random.key(...)"
        )


def _history_guiding(history_guidance, cond) -> bool:
    """Whether history guidance applies: active, with conditioning frames the sampler keeps clean."""
    guiding = history_guidance is not None and history_guidance.active and cond is not None
    if guiding and cond.policy == "released":
        raise ValueError(
            "history guidance needs context frames the sampler keeps clean: policy 'hold' or "
            "'replace' ('released' labels them like the other frames)"
        )
    return guiding


def _initial_state(schedule: Schedule, x_T, first_tau, cond, key):
    """x_T with the conditioning frames set to their values (noised to `first_tau` when that is
    > 0 under 'replace')."""
    if cond is None:
        return x_T
    mask = extract(cond.mask, x_T.ndim)
    values = cond.values.astype(x_T.dtype)
    if cond.policy == "replace":
        first = jnp.where(
            extract(first_tau > 0, x_T.ndim),
            q_sample(schedule, values, first_tau, conditioning_noise(key, 0, x_T.shape)),
            values,
        )
        return jnp.where(mask, first, x_T)
    return jnp.where(mask, values, x_T)  # 'hold' and 'released' (the clean latent written into x_T)


def _evaluator(model_fn, schedule: Schedule, cond, history_guidance, key, shape):
    """evaluator(i) -> evaluate(x_raw, t) -> (what the model sees, its guided output) at step i;
    `history_guidance` is None when it does not apply."""
    if history_guidance is not None:
        level = history_guidance.level(schedule.num_timesteps)
        guided = model_fn if _takes_history(model_fn) else _two_calls(model_fn, shape[-1])

    def evaluator(i):
        zc = conditioning_noise(key, i, shape) if cond is not None else None

        def evaluate(x_raw, t):
            """(what the model sees, its guided output) for the state x_raw at tau t."""
            x_in = show_conditioning(schedule, x_raw, t, cond, zc)
            if history_guidance is None:
                return x_in, model_fn(x_in, t)
            x_h, tau_h = history_free_input(schedule, x_in, t, cond.mask, cond.values, level,
                                            history_noise(key, i, shape))
            history = HistoryInput(x_h, tau_h, cond.mask, float(history_guidance.scale))
            return x_in, guided(x_in, t, history=history)

        return evaluate

    return evaluator


def _step(sampler: str, schedule: Schedule, key, shape, i, evaluate, out, x_in, tau, nxt, *, eta,
          clip_denoised):
    """x after step i of `sampler`, given the model output `out` at the input `x_in` it saw
    (`evaluate(x, tau)`, as `_evaluator` makes it, for the second evaluation of 'ode_heun')."""
    if sampler == "ddim":
        noise = step_noise(key, i, shape) if eta != 0.0 else None
        return ddim_step(schedule, out, x_in, tau, nxt, noise, eta=eta, clip_denoised=clip_denoised)[0]
    if sampler == "ddpm":
        return ddpm_step(
            schedule, out, x_in, tau, nxt, step_noise(key, i, shape),
            learn_sigma=out.shape[-1] == 2 * shape[-1], clip_denoised=clip_denoised,
        )[0]
    if sampler == "sde_euler":
        return sde_euler_step(schedule, out, x_in, tau, nxt, step_noise(key, i, shape),
                              clip_denoised=clip_denoised)[0]
    if sampler == "ode_euler":
        return ode_euler_step(schedule, out, x_in, tau, nxt, clip_denoised=clip_denoised)[0]
    return ode_heun_step(schedule, evaluate, out, x_in, tau, nxt, clip_denoised=clip_denoised)[0]


def make_sampler(
    model_fn: Callable,
    schedule: Schedule,
    *,
    sampler: str = "ddim",
    eta: float = 0.0,
    clip_denoised: bool = False,
    history_guidance: HistoryGuidance | None = None,
    return_trajectory: bool = False,
):
    """A jitted `sample` with the static choices bound: fn(x_T, taus, tau_next, rng=None,
    cond=None, params=None). It compiles once per (shapes, conditioning policy) and is reused
    for every batch. With params, the model is called as model_fn(params, x, tau) (plus
    history=... when it takes it): pass large weights this way, so that they are arguments of
    the compiled program, not constants in it.
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
            history_guidance=history_guidance,
            return_trajectory=return_trajectory,
        )

    return jax.jit(run)
