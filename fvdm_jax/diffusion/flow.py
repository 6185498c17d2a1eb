"""Rectified flow with per-frame noise levels (Wan 2.1, Pusa): the objective and the Euler sampler.

A frame at noise level sigma in [0, 1] is x_sigma = (1 - sigma) x0 + sigma eps; the model predicts
the velocity v = eps - x0 (so x0 = x_sigma - sigma v) and is told the timestep sigma * T on the
0-T scale (T = 1000). Levels come from a shifted grid: shift(s) = k s / (1 + (k - 1) s) (k = 5 for
Wan 2.1 at 720p, 3 at 480p).

Training draws an integer index per frame with the schemes of fvdm_jax/diffusion/schemes.py (PTSS,
independent = Pusa's, FoPP), exactly as for the VP process, and reads its level from the training
grid: index i in [0, T - 1] has sigma = shift((i + 1) / T), so index T - 1 is pure noise and the
order matches the VP convention (larger index = noisier). This is the grid DiffSynth's
FlowMatchScheduler trains Wan and Pusa on (its linspace(1, 0, T + 1)[:-1], here in ascending order).

Sampling integrates dx/dsigma = v with Euler steps over an (S + 1, B, F) array of levels, one
`lax.scan`; every frame moves by (sigma_next - sigma) v, so a frame whose level does not change
(a conditioning frame at sigma * m with m = 0, Pusa's noise multiplier) stays exactly as it is.
The inference grid of S steps is shift(linspace(1, 0, S + 1)[:-1]) followed by 0, as Wan's and
DiffSynth's samplers use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def shift_sigmas(sigmas, shift: float):
    """The timestep shift of Wan / SD3: k s / (1 + (k - 1) s); 0 and 1 stay in place."""
    sigmas = np.asarray(sigmas, np.float64)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """The training grid and inference grids of a shifted rectified flow."""

    num_timesteps: int = 1000
    shift: float = 5.0

    def __post_init__(self):
        if int(self.num_timesteps) < 2:
            raise ValueError(f"diffusion.num_timesteps={self.num_timesteps} must be >= 2")
        if not float(self.shift) > 0:
            raise ValueError(f"diffusion.shift={self.shift} must be > 0")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowSchedule:
        return cls(int(config.get("num_timesteps", config.get("num_train_timesteps", 1000))),
                   float(config.get("shift", 5.0)))

    @property
    def train_sigmas(self) -> np.ndarray:
        """(T,) float32: the level of training index i, shift((i + 1) / T), ascending to 1."""
        t = self.num_timesteps
        return shift_sigmas(np.arange(1, t + 1) / t, self.shift).astype(np.float32)

    def sigma(self, index) -> jnp.ndarray:
        """The levels of integer training indices (any shape)."""
        return jnp.asarray(self.train_sigmas)[jnp.asarray(index, jnp.int32)]

    def inference_sigmas(self, num_steps: int) -> np.ndarray:
        """(S + 1,) float32 from 1 down to 0: shift(linspace(1, 0, S + 1)[:-1]) and a final 0."""
        if int(num_steps) < 1:
            raise ValueError(f"sample.num_steps={num_steps} must be >= 1")
        grid = shift_sigmas(np.linspace(1.0, 0.0, int(num_steps) + 1)[:-1], self.shift)
        return np.concatenate([grid, [0.0]]).astype(np.float32)

    def model_timesteps(self, sigmas) -> jnp.ndarray:
        """What the model is told: sigma on the 0-T scale."""
        return jnp.asarray(sigmas, jnp.float32) * self.num_timesteps


def _per_frame(sigmas, ndim: int) -> jnp.ndarray:
    """(B, F) levels broadcast against (B, F, ...) latents."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    return sigmas.reshape(sigmas.shape + (1,) * (ndim - sigmas.ndim))


def noised(x0, sigmas, noise) -> jnp.ndarray:
    """x_sigma = (1 - sigma) x0 + sigma eps, sigma (B, F) per frame of x0 (B, F, ...)."""
    s = _per_frame(sigmas, x0.ndim)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0, noise) -> jnp.ndarray:
    """What the model learns to predict: v = eps - x0."""
    return noise - x0


def flow_loss(model_fn: Callable, schedule: FlowSchedule, x0, index, noise, weights=None) -> dict:
    """The rectified-flow objective for one batch: per-frame levels from training indices
    (B, F), x0 (B, F, ...) clean latents, noise like x0. model_fn(x_sigma, timesteps (B, F)) -> v.
    weights: optional per-frame loss weights (B, F). Returns {'loss', 'mse'} (means)."""
    sigmas = schedule.sigma(index)
    x_t = noised(x0, sigmas, noise)
    v = model_fn(x_t, schedule.model_timesteps(sigmas)).astype(jnp.float32)
    per_frame = jnp.mean(jnp.square(v - velocity_target(x0, noise)).reshape(index.shape + (-1,)), -1)
    mse = jnp.mean(per_frame)
    loss = mse if weights is None else jnp.mean(per_frame * jnp.asarray(weights, jnp.float32))
    return {"loss": loss, "mse": mse}


def euler_step(x, v, sigma, sigma_next) -> jnp.ndarray:
    """One Euler step of dx/dsigma = v from per-frame levels sigma to sigma_next (B, F)."""
    return x + _per_frame(jnp.asarray(sigma_next) - jnp.asarray(sigma), x.ndim) * v


def condition_sigmas(sigmas, frames, multiplier: float) -> np.ndarray:
    """Pusa's conditioning: (S + 1,) or (S + 1, B, F) levels -> (S + 1, B, F) levels in which the
    given frames (a (B, F) bool mask) sit at sigma * multiplier (0: kept clean)."""
    frames = np.asarray(frames, bool)
    sigmas = np.asarray(sigmas, np.float32)
    if sigmas.ndim == 1:
        sigmas = np.broadcast_to(sigmas[:, None, None], (len(sigmas),) + frames.shape)
    return np.where(frames[None], sigmas * np.float32(multiplier), sigmas).astype(np.float32)


def start_latents(clean, frames, sigmas0, noise) -> jnp.ndarray:
    """The first x of a run: noise, with conditioning frames (mask (B, F)) noised from their clean
    latents to their first level (exactly the clean latent at level 0)."""
    cond = noised(clean, sigmas0, noise)
    mask = _per_frame(jnp.asarray(frames, bool), noise.ndim)
    return jnp.where(mask, cond, noise)


def euler_sample(model_fn: Callable, schedule: FlowSchedule, x_start, sigmas) -> jnp.ndarray:
    """Integrates from x_start at sigmas[0] through the (S + 1, B, F) levels with one Euler step
    per row: one `lax.scan`. model_fn(x, timesteps (B, F)) -> v. Returns the final x."""
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(x, pair):
        sigma, sigma_next = pair
        v = model_fn(x, schedule.model_timesteps(sigma)).astype(jnp.float32)
        return euler_step(x, v, sigma, sigma_next).astype(x.dtype), None

    x, _ = jax.lax.scan(step, x_start, (sigmas[:-1], sigmas[1:]))
    return x


def text_guided(model_fn: Callable, scale: float) -> Callable:
    """Classifier-free guidance on the text: model_fn(x, t, context) -> v; returns
    f(x, t, (context, null_context)) = v_null + scale (v_text - v_null), one batched call."""

    def guided(x, t, contexts):
        context, null = contexts
        if scale == 1.0:
            return model_fn(x, t, context)
        both = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                        jnp.concatenate([context, null]))
        v_text, v_null = jnp.split(both, 2)
        return v_null + scale * (v_text - v_null)

    return guided
