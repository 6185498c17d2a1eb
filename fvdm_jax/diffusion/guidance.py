"""Guidance at sampling time: classifier-free guidance on the class, history guidance on the
context frames, and both in one batched model call.

History guidance (DFoT, Song et al. 2025, arXiv 2502.06764) is classifier-free guidance whose
condition is the context: the frames a task gives (i2v's image, interpolation's keyframes, a
long video's previous chunk). A model trained with per-frame timesteps (PTSS p > 0) has seen
frames at every noise level next to each other, so a context frame noised to tau_h and labelled
tau_h is that model's own "context partly or wholly removed": no retraining, no null token.
Per step, at the same noisy video x:

    c    = eps(x, the context as the policy shows it, label)      the conditional prediction
    u_y  = eps(x, the context as shown, null label)               class-free (with cfg_scale)
    u_h  = eps(x, the context noised to tau_h and labelled tau_h, label)          history-free

    guided = u_y + s_y (c - u_y) + (s_h - 1) (c - u_h)      on the generated frames
    guided = u_y + s_y (c - u_y)                            on the context frames

tau_h = T - 1 ('vanilla': the context removed) or `noise_level` ('fractional': only its fine
detail removed, which DFoT finds keeps motion that vanilla guidance freezes). Each term is the
guidance of one condition given the other, i.e. the score of
p(x | y, h) p(y | x, h)^(s_y - 1) p(h | x, y)^(s_h - 1): with history guidance off (or s_h = 1)
this is the official classifier-free guidance, with s_y = 1 it is u_h + s_h (c - u_h), and
s_h = 1 gives exactly c. The three predictions are one call on a (3B, ...) batch (2B with only
one guidance). Nesting the two guidances instead (CFG inside each history branch) would need a
fourth call and add an interaction term. Context frames get no history term: u_h sees them at
another tau, and under 'replace' the sampler moves them with the prediction. (Without class
guidance, s_y = 1 and u_y is not computed.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fvdm_jax.diffusion.gaussian import q_sample
from fvdm_jax.diffusion.schedule import Schedule, extract

HISTORY_MODES = ("vanilla", "fractional")


@dataclasses.dataclass(frozen=True)
class HistoryGuidance:
    """History-guidance settings (static: part of what a sampler compiles for).

    scale: s_h; 0 turns guidance off (no extra model call); s_h = 1 equals the plain conditional
    prediction, s_h > 1 pushes the generated frames toward the context. mode: 'vanilla' (the
    history-free branch sees the context at tau = T - 1) or 'fractional' (at `noise_level`, an
    original-scale tau in [0, T - 1]).
    """

    scale: float = 0.0
    mode: str = "vanilla"
    noise_level: int | None = None

    def __post_init__(self):
        if not float(self.scale) >= 0.0:
            raise ValueError(f"history guidance scale={self.scale} must be >= 0 (0 = off)")
        if self.mode not in HISTORY_MODES:
            raise ValueError(f"history guidance mode={self.mode!r} is not one of {HISTORY_MODES}")
        if self.mode == "fractional" and self.noise_level is None:
            raise ValueError(
                "fractional history guidance needs noise_level (an integer tau in [0, T - 1], "
                "e.g. sample.history_noise_level=500)"
            )

    @property
    def active(self) -> bool:
        return float(self.scale) != 0.0

    def level(self, num_timesteps: int) -> float:
        """The tau of the context frames in the history-free branch."""
        if self.mode == "vanilla":
            return float(num_timesteps - 1)
        level = int(self.noise_level)
        if not 0 <= level <= num_timesteps - 1:
            raise ValueError(
                f"history noise_level={level} must lie in [0, T - 1 = {num_timesteps - 1}]"
            )
        return float(level)


class HistoryInput(NamedTuple):
    """What a history-guided model call needs besides (x, tau): the history-free input x (B, N,
    H, W, C) and tau (B, N), the context mask (B, N) and the scale s_h."""

    x: jnp.ndarray
    tau: jnp.ndarray
    mask: jnp.ndarray
    scale: float


def history_noise(rng, step, shape):
    """The noise that shows the context frames at tau_h in the history-free branch of step
    `step` (the sampler's step noise is fold_in(rng, step), its conditioning noise index 1)."""
    return jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(rng, step), 2), shape, jnp.float32
    )


def history_free_input(schedule: Schedule, x_in, tau, mask, values, level: float, noise):
    """(x, tau) of the history-free branch: the context frames (mask (B, N)) become
    q_sample(values, level, noise) labelled `level`; every other frame is x_in at its tau."""
    tau = jnp.asarray(tau, jnp.float32)
    mask = jnp.asarray(mask, bool)
    tau_h = jnp.where(mask, jnp.float32(level), tau)
    noised = q_sample(schedule, values.astype(x_in.dtype), tau_h, noise)
    return jnp.where(extract(mask, x_in.ndim), noised, x_in), tau_h


def combine(cond_out, in_channels: int, *, class_free=None, cfg_scale: float = 1.0,
            history_free=None, history: HistoryInput | None = None):
    """The guided output (module docstring) from the predictions (B, N, H, W, C or 2C): eps
    channels guided, the variance channels the conditional prediction's."""
    c = cond_out[..., :in_channels]
    guided = c
    if class_free is not None:
        u = class_free[..., :in_channels]
        guided = u + cfg_scale * (c - u)
    if history_free is not None:
        term = (history.scale - 1.0) * (c - history_free[..., :in_channels])
        guided = guided + jnp.where(extract(history.mask, c.ndim), 0.0, term)
    return jnp.concatenate([guided, cond_out[..., in_channels:]], axis=-1)


def guided_model_fn(apply_fn: Callable, in_channels: int, *, labels=None,
                    null_label: int | None = None, cfg_scale: float = 1.0):
    """model_fn(x, tau, history=None) for `samplers.sample` with both guidances in one call.

    apply_fn(x (K*B, N, H, W, C), tau (K*B, N), labels (K*B,) or None) -> (K*B, N, H, W, C or
    2C), eps first. Class guidance runs when labels are given and cfg_scale != 1 (null_label:
    the null class id); history guidance when the sampler passes a `HistoryInput`. Returns
    (B, N, H, W, C or 2C).
    """
    class_guided = labels is not None and float(cfg_scale) != 1.0
    if class_guided and null_label is None:
        raise ValueError("classifier-free guidance needs null_label (the null class id)")
    labels = None if labels is None else jnp.asarray(labels)

    def model_fn(x, tau, history: HistoryInput | None = None):
        xs, taus = [x], [jnp.asarray(tau, jnp.float32)]
        ys = None if labels is None else [labels]
        if class_guided:
            xs.append(x), taus.append(taus[0]), ys.append(jnp.full_like(labels, null_label))
        if history is not None:
            xs.append(history.x), taus.append(history.tau)
            if ys is not None:
                ys.append(labels)
        if len(xs) == 1:
            return apply_fn(x, taus[0], labels)
        out = apply_fn(jnp.concatenate(xs), jnp.concatenate(taus),
                       None if ys is None else jnp.concatenate(ys))
        parts = jnp.split(out, len(xs), axis=0)
        return combine(parts[0], in_channels, class_free=parts[1] if class_guided else None,
                       cfg_scale=float(cfg_scale), history_free=parts[-1] if history else None,
                       history=history)

    return model_fn


def cfg_model_fn(apply_fn: Callable, labels, null_label: int, scale: float, in_channels: int):
    """Classifier-free guidance as a model_fn(x, tau) for `sample` (official forward_with_cfg).

    apply_fn(x (2B, ...), tau (2B, N), labels (2B,)) -> (2B, N, H, W, C or 2C). The batch is
    doubled as [conditional; unconditional (null_label)]; the first in_channels output channels
    become uncond + scale * (cond - uncond), the remaining (variance) channels are the
    conditional half's. Returns (B, N, H, W, C or 2C). A `guided_model_fn`: history guidance
    joins the same call.
    """
    return guided_model_fn(apply_fn, in_channels, labels=labels, null_label=null_label,
                           cfg_scale=scale)
