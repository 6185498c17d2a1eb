"""The FVDM training loss: per-sample eps MSE plus the variational-bound term of the variance.

Official semantics (improved-DDPM hybrid loss, per frame): loss = mean over (F, H, W, C) of
(eps - eps_pred)^2 + vb, where vb is the KL between the true posterior and the model's Gaussian
in bits (mean over all dims), computed with eps_pred stop-gradiented so that it trains only the
variance. vb switches to the discretized decoder NLL only when ALL frames of a sample are at t=0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fvdm_jax.diffusion.gaussian import (
    eps_output,
    p_mean_variance,
    predict_xstart_from_eps,
    prediction_target,
    q_posterior_mean_variance,
    q_sample,
)
from fvdm_jax.diffusion.schedule import Schedule


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over all non-batch axes: (B, ...) -> (B,)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretized to 256 bins under N(means, exp(log_scales)^2)."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def vb_terms_bpd(schedule: Schedule, model_output, x_start, x_t, tau):
    """Per-sample variational-bound term in bits: (B,).

    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) averaged over all dims, or the decoder NLL for
    samples whose frames are all at t = 0 (the official video rule).
    """
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x_start, x_t, tau)
    out = p_mean_variance(schedule, model_output, x_t, tau, learn_sigma=True)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
    nll = -discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )
    nll = mean_flat(nll)
    all_clean = jnp.max(tau, axis=1) == 0
    return jnp.where(all_clean, nll, kl) / math.log(2.0)


def loss_terms(schedule: Schedule, model_output, x_start, x_t, tau, noise, *, learn_sigma=True):
    """Training terms from a model output that was computed at (x_t, tau).

    Returns a dict of per-sample (B,) 'loss', 'mse' (and 'vb' when learn_sigma) plus
    'pred_xstart' (B, F, H, W, C), the x_0 implied by the prediction. 'mse' is against the
    target of schedule.prediction (eps, the official loss, or v); vb reads the eps it implies.
    """
    channels = x_start.shape[-1]
    pred = model_output[..., :channels]
    target = prediction_target(schedule, x_start, tau, noise)
    terms = {"mse": mean_flat(jnp.square(target - pred))}
    eps_pred = eps_output(schedule, model_output, x_t, tau)[..., :channels]
    if learn_sigma:
        frozen = jnp.concatenate(
            [jax.lax.stop_gradient(eps_pred), model_output[..., channels:]], axis=-1
        )
        terms["vb"] = vb_terms_bpd(schedule, frozen, x_start, x_t, tau)
        terms["loss"] = terms["mse"] + terms["vb"]
    else:
        terms["loss"] = terms["mse"]
    terms["pred_xstart"] = predict_xstart_from_eps(schedule, x_t, tau, eps_pred)
    return terms


def training_losses(
    schedule: Schedule,
    model_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    x_start,
    tau,
    noise,
    *,
    learn_sigma: bool = True,
):
    """Noises x_start per frame at tau, runs model_fn(x_t, tau) and returns `loss_terms` + x_t."""
    x_t = q_sample(schedule, x_start, tau, noise)
    terms = loss_terms(
        schedule, model_fn(x_t, tau), x_start, x_t, tau, noise, learn_sigma=learn_sigma
    )
    terms["x_t"] = x_t
    return terms
