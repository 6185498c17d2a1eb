"""Single reverse-diffusion steps with per-frame timesteps (DDIM and ancestral DDPM).

A step takes the model output at (x, tau) and moves every frame from tau to its own tau_next
(original-scale units; tau_next = -1 ends the frame clean). On the grid of a respaced schedule
these equal the official respaced DDIM / DDPM steps; a frame whose tau_next is -1 receives the
model's x_0 prediction and no noise, which is the official treatment of frames at t = 0.
"""

from __future__ import annotations

import jax.numpy as jnp

from fvdm_jax.diffusion.gaussian import (
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
)
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
