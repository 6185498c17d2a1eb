"""Per-frame Gaussian diffusion math: forward noising, posteriors and the model's p(x_next | x).

All functions are pure and jit-friendly. Videos are (B, F, H, W, C); timesteps are per frame,
(B, F), in the original-scale units of `schedule.py`. A step goes from tau to tau_next; when
tau_next is omitted it is tau - 1, the single step of the full T-step process (training).
"""

from __future__ import annotations

import jax.numpy as jnp

from fvdm_jax.diffusion.schedule import Schedule, extract


def _log_abar(schedule: Schedule, tau, ndim: int) -> jnp.ndarray:
    return extract(schedule.log_alpha_bar(tau), ndim)


def q_sample(schedule: Schedule, x_start, tau, noise):
    """x_tau = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) noise, each frame at its own tau."""
    log_abar = _log_abar(schedule, tau, x_start.ndim)
    return jnp.exp(0.5 * log_abar) * x_start + jnp.sqrt(-jnp.expm1(log_abar)) * noise


def predict_xstart_from_eps(schedule: Schedule, x_t, tau, eps):
    """x_0 = x_t / sqrt(alpha_bar) - sqrt(1 / alpha_bar - 1) eps."""
    log_abar = _log_abar(schedule, tau, x_t.ndim)
    return jnp.exp(-0.5 * log_abar) * x_t - jnp.sqrt(jnp.expm1(-log_abar)) * eps


def predict_eps_from_xstart(schedule: Schedule, x_t, tau, x_start):
    """eps = (x_t / sqrt(alpha_bar) - x_0) / sqrt(1 / alpha_bar - 1)."""
    log_abar = _log_abar(schedule, tau, x_t.ndim)
    return (jnp.exp(-0.5 * log_abar) * x_t - x_start) / jnp.sqrt(jnp.expm1(-log_abar))


def predict_eps_from_v(schedule: Schedule, x_t, tau, v):
    """eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t."""
    log_abar = _log_abar(schedule, tau, x_t.ndim)
    return jnp.exp(0.5 * log_abar) * v + jnp.sqrt(-jnp.expm1(log_abar)) * x_t


def v_target(schedule: Schedule, x_start, tau, noise):
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, per frame."""
    log_abar = _log_abar(schedule, tau, x_start.ndim)
    return jnp.exp(0.5 * log_abar) * noise - jnp.sqrt(-jnp.expm1(log_abar)) * x_start


def prediction_target(schedule: Schedule, x_start, tau, noise):
    """What the model's first C channels are trained to predict (schedule.prediction)."""
    if schedule.prediction == "v":
        return v_target(schedule, x_start, tau, noise)
    return noise


def eps_output(schedule: Schedule, model_output, x_t, tau):
    """The model output with its first C channels as eps, whatever schedule.prediction is.

    Every sampler and the variational-bound term read eps from the output; this is the one place
    where another parameterization becomes eps (the variance channels pass through).
    """
    if schedule.prediction == "eps":
        return model_output
    channels = x_t.shape[-1]
    eps = predict_eps_from_v(schedule, x_t, tau, model_output[..., :channels])
    return jnp.concatenate([eps, model_output[..., channels:]], axis=-1)


def _next(tau, tau_next):
    return jnp.asarray(tau) - 1 if tau_next is None else tau_next


def step_log_beta_and_posterior(schedule: Schedule, tau, tau_next, ndim: int):
    """Coefficients of the step tau -> tau_next, each (B, F, 1, 1, 1).

    Returns (log_beta, coef_x0, coef_xt, posterior_log_variance_clipped) where the step's beta is
    1 - alpha_bar(tau) / alpha_bar(tau_next). A step that ends clean (tau_next = -1) has zero
    posterior variance; as in the official process its log variance is clipped to that of the step
    tau + 1 -> tau on the original grid (it enters only the variance of frames that receive no
    noise, and the learned-range interpolation of the training loss at t = 0). From tau > T - 2
    there is no step tau + 1 -> tau: the last step T - 1 -> T - 2 stands in, so a frame that
    jumps from T - 1 straight to clean has a finite variance for any model output. Both log
    variances are floored at log(1e-30), far below any real step's (the smallest, 1 -> 0 of the
    linear schedule, is 5e-5): a frame that does not move (tau_next = tau, beta 0) gets a finite
    log variance instead of -inf, and no learned interpolation of it can make 0 * inf.
    """
    log_abar = _log_abar(schedule, tau, ndim)
    log_abar_next = _log_abar(schedule, tau_next, ndim)
    one_minus_abar = -jnp.expm1(log_abar)
    one_minus_abar_next = -jnp.expm1(log_abar_next)
    beta = -jnp.expm1(log_abar - log_abar_next)
    coef_x0 = beta * jnp.exp(0.5 * log_abar_next) / one_minus_abar
    coef_xt = one_minus_abar_next * jnp.exp(0.5 * (log_abar - log_abar_next)) / one_minus_abar
    variance = beta * one_minus_abar_next / one_minus_abar

    below = jnp.minimum(jnp.asarray(tau, jnp.float32), float(schedule.num_timesteps - 2))
    log_abar_below = _log_abar(schedule, below, ndim)
    log_abar_up = _log_abar(schedule, below + 1, ndim)
    variance_up = (-jnp.expm1(log_abar_up - log_abar_below) * -jnp.expm1(log_abar_below)
                   / -jnp.expm1(log_abar_up))
    ends_clean = extract(jnp.asarray(tau_next) < 0, ndim)
    log_variance_clipped = _floored_log(jnp.where(ends_clean, variance_up, variance))
    return _floored_log(beta), coef_x0, coef_xt, log_variance_clipped


_LOG_VARIANCE_FLOOR = -69.0  # log(1e-30)


def _floored_log(value):
    return jnp.maximum(jnp.log(jnp.maximum(value, 0.0)), _LOG_VARIANCE_FLOOR)


def q_posterior_mean_variance(schedule: Schedule, x_start, x_t, tau, tau_next=None):
    """Mean, variance and clipped log variance of q(x_tau_next | x_tau, x_0), per frame."""
    tau_next = _next(tau, tau_next)
    _, coef_x0, coef_xt, log_var = step_log_beta_and_posterior(schedule, tau, tau_next, x_t.ndim)
    mean = coef_x0 * x_start + coef_xt * x_t
    return mean, jnp.exp(log_var), log_var


def p_mean_variance(
    schedule: Schedule,
    model_output,
    x_t,
    tau,
    tau_next=None,
    *,
    learn_sigma: bool = True,
    clip_denoised: bool = False,
):
    """The model's Gaussian p(x_tau_next | x_tau) from its output (B, F, H, W, C or 2C).

    With learn_sigma the second C channels v in [-1, 1] interpolate the log variance between the
    clipped posterior variance (v = -1) and the step's beta (v = +1). Without it the variance is
    the step's beta ("fixed large", the DiT/Latte default), clipped as above at the clean end.
    Returns a dict: mean, variance, log_variance, pred_xstart, eps.
    """
    tau_next = _next(tau, tau_next)
    channels = x_t.shape[-1]
    log_beta, coef_x0, coef_xt, min_log = step_log_beta_and_posterior(
        schedule, tau, tau_next, x_t.ndim
    )
    if learn_sigma:
        if model_output.shape[-1] != 2 * channels:
            raise ValueError(
                f"learn_sigma needs {2 * channels} output channels, got {model_output.shape[-1]}"
            )
        eps, var_values = model_output[..., :channels], model_output[..., channels:]
        frac = (var_values + 1) / 2
        log_variance = frac * log_beta + (1 - frac) * min_log
    else:
        eps = model_output
        ends_clean = extract(jnp.asarray(tau_next) < 0, x_t.ndim)
        log_variance = jnp.broadcast_to(jnp.where(ends_clean, min_log, log_beta), x_t.shape)
    pred_xstart = predict_xstart_from_eps(schedule, x_t, tau, eps)
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean = coef_x0 * pred_xstart + coef_xt * x_t
    return {
        "mean": mean,
        "variance": jnp.exp(log_variance),
        "log_variance": log_variance,
        "pred_xstart": pred_xstart,
        "eps": eps,
    }
