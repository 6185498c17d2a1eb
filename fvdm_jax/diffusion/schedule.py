"""Noise schedules, per-frame coefficient gathers, respacing, and the continuous VP-SDE views.

Timestep units (the contract every sampler, task and loss follows): timestep arrays hold
ORIGINAL-scale diffusion timesteps tau in [0, T-1] (floats allowed), one per frame, shape (B, F).
tau = -1 means "clean" (alpha_bar = 1). A sampling step goes from tau to tau_next per frame.

Every coefficient derives from log(alpha_bar(tau)), read from a float64 table (cast to float32)
at integer tau and interpolated linearly in log(alpha_bar) between grid points otherwise. From it,
alpha_bar = exp(l) and 1 - alpha_bar = -expm1(l) stay accurate near tau = 0, where the naive
1 - alpha_bar loses precision in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "cosine")
# What the model's first C output channels mean: 'eps' the noise (the official FVDM/Latte/DiT
# target), 'v' = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho), whose x_0 error is
# not amplified by 1 / sqrt(alpha_bar) at high noise. Losses and samplers convert to eps.
PREDICTIONS = ("eps", "v")
# Keys of a `diffusion` config section that are not the VP schedule's (Schedule.from_config skips them).
OTHER_PROCESS_KEYS = ("process", "shift")


def make_betas(
    beta_schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """float64 betas of length T.

    'linear': linspace(beta_start, beta_end) scaled by 1000/T, so that any T approximates the same
    continuous process (the official schedule). 'cosine': the improved-DDPM squared-cosine
    alpha_bar with betas capped at 0.999.
    """
    if num_timesteps < 2:
        raise ValueError(f"diffusion.num_timesteps={num_timesteps} must be at least 2")
    if beta_schedule == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(
            scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64
        )
    if beta_schedule == "cosine":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_timesteps, dtype=np.float64)
        return np.array(
            [
                min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                for i in steps
            ],
            dtype=np.float64,
        )
    raise ValueError(f"diffusion.beta_schedule={beta_schedule!r} is not one of {BETA_SCHEDULES}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A discrete DDPM noise schedule (hashable: usable as a static jit argument)."""

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"
    betas: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"diffusion.prediction={self.prediction!r} is not one of {PREDICTIONS}"
            )
        betas = make_betas(self.beta_schedule, self.num_timesteps, self.beta_start, self.beta_end)
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]; check diffusion.beta_start/beta_end")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", np.cumprod(1.0 - betas))

    @classmethod
    def from_config(cls, diffusion_config: Mapping[str, Any]) -> Schedule:
        """The schedule of a `diffusion` section; its `process` and `shift` keys (which process
        runs, the flow's shift: fvdm_jax/diffusion/flow.py) are not the schedule's and are skipped."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        given = [k for k in diffusion_config.keys() if k not in OTHER_PROCESS_KEYS]
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(
                f"unknown diffusion config keys {unknown}; known keys: {sorted(known)}"
            )
        return cls(**{k: diffusion_config[k] for k in given})

    def to_config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @property
    def log_alphas_cumprod_table(self) -> np.ndarray:
        """float64 log(alpha_bar) at tau = -1, 0, ..., T-1 (index tau + 1); log alpha_bar(-1) = 0."""
        return np.concatenate([[0.0], np.log(self.alphas_cumprod)])

    def log_alpha_bar(self, tau) -> jnp.ndarray:
        """log(alpha_bar) at original-scale timesteps tau (any shape, int or float), float32.

        Exact table values on the grid, linear interpolation in log(alpha_bar) between grid
        points; tau is clipped to [-1, T-1].
        """
        table = jnp.asarray(self.log_alphas_cumprod_table, jnp.float32)
        pos = jnp.clip(jnp.asarray(tau, jnp.float32) + 1.0, 0.0, float(self.num_timesteps))
        lo = jnp.floor(pos)
        frac = pos - lo
        lo = lo.astype(jnp.int32)
        hi = jnp.minimum(lo + 1, self.num_timesteps)
        return table[lo] * (1.0 - frac) + table[hi] * frac


def extract(values: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """Per-frame coefficients (B, F) -> (B, F, 1, ..., 1) broadcastable to an ndim video array."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


# ----------------------------------------------------------------------------------------------
# Respacing (improved-diffusion's "section counts" and "ddimN").


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """Original timesteps kept by a respacing spec, sorted ascending.

    "50" keeps 50 evenly spaced steps (first 0, last T-1, with improved-diffusion's rounding);
    "10,20" splits the T steps into 2 sections and keeps 10 and 20 of them; "ddim50" keeps a fixed
    integer stride that yields exactly 50 steps.
    """
    spec = str(section_counts).strip()
    if spec.startswith("ddim"):
        desired = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(
            f"respacing {spec!r}: no integer stride gives exactly {desired} of {num_timesteps} steps"
        )
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"respacing {spec!r} is not a section-count list like '50' or '10,20', or 'ddimN'"
        ) from None
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"respacing {spec!r}: cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def respaced_alphas_cumprod(schedule: Schedule, timestep_map) -> np.ndarray:
    """alpha_bar of the respaced process, float64: the cumulative product of its derived betas
    beta_k = 1 - alpha_bar[map[k]] / alpha_bar[map[k-1]] (as the official SpacedDiffusion)."""
    kept = schedule.alphas_cumprod[np.sort(np.asarray(timestep_map, np.int64))]
    new_betas = 1.0 - kept / np.concatenate([[1.0], kept[:-1]])
    return np.cumprod(1.0 - new_betas)


def step_pairs(timestep_map) -> tuple[np.ndarray, np.ndarray]:
    """Descending (tau, tau_next) pairs that walk a respaced grid down to clean (tau_next = -1)."""
    taus = np.sort(np.asarray(timestep_map, np.int64))[::-1]
    return taus.copy(), np.append(taus[1:], -1)


# ----------------------------------------------------------------------------------------------
# The continuous VP-SDE view (Song et al. 2020), beta(s) linear from beta_min to beta_max on s in
# [0, 1]. The discrete linear schedule is its discretization: beta_i = beta(i / (T-1)) / T, so the
# continuous time of original timestep tau is s = tau / (T-1). It is the paper's description; its
# marginals differ from the discrete ones the network is trained on (by up to 0.07 in log
# alpha_bar, 29% in std at tau = 1), so the samplers run `DiscreteVPSDE` instead.


@dataclasses.dataclass(frozen=True)
class VPSDE:
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_timesteps: int = 1000

    @classmethod
    def from_schedule(cls, schedule: Schedule) -> VPSDE:
        if schedule.beta_schedule != "linear":
            raise ValueError("the VP-SDE view exists for the linear beta schedule only")
        scale = 1000.0 / schedule.num_timesteps
        return cls(
            beta_min=schedule.beta_start * scale * schedule.num_timesteps,
            beta_max=schedule.beta_end * scale * schedule.num_timesteps,
            num_timesteps=schedule.num_timesteps,
        )

    def beta(self, s):
        return self.beta_min + s * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, s):
        """log of the squared marginal mean coefficient: -(beta_min s + (beta_max-beta_min) s^2/2)."""
        return -(self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2)

    def marginal_mean_coeff(self, s):
        """sqrt(alpha_bar(s)): x_s = mean_coeff * x_0 + std * noise."""
        xp = jnp if isinstance(s, jax.Array) else np
        return xp.exp(0.5 * self.log_alpha_bar(s))

    def marginal_std(self, s):
        xp = jnp if isinstance(s, jax.Array) else np
        return xp.sqrt(-xp.expm1(self.log_alpha_bar(s)))

    def time_of_timestep(self, tau):
        """Original-scale timestep -> continuous time s in [0, 1]."""
        return tau / (self.num_timesteps - 1)

    def timestep_of_time(self, s):
        """Continuous time s in [0, 1] -> original-scale (float) timestep."""
        return s * (self.num_timesteps - 1)

    def discrete_betas(self) -> np.ndarray:
        """float64 betas of the discretization: beta(i / (T-1)) / T for i = 0..T-1."""
        i = np.arange(self.num_timesteps, dtype=np.float64)
        return self.beta(i / (self.num_timesteps - 1)) / self.num_timesteps


@dataclasses.dataclass(frozen=True)
class DiscreteVPSDE:
    """The VP-SDE whose marginals are the discrete schedule's: the continuous samplers' process.

    Time is the original-scale tau itself, on [-1, T-1] (-1: clean). The integrated rate
    lambda(tau) = -log alpha_bar(tau) is the schedule's own table, linear between grid points
    (`Schedule.log_alpha_bar`), so beta(tau) = d lambda / d tau is constant on every cell
    (i-1, i]: -log(1 - beta_i). The SDE

        dx = -beta(tau) x / 2 dtau + sqrt(beta(tau)) dW

    has the marginals x_tau = sqrt(alpha_bar(tau)) x_0 + sqrt(1 - alpha_bar(tau)) eps: at every
    integer tau those the network was trained on, for any schedule (linear or cosine). `VPSDE`
    (the paper's beta(s) at s = tau / (T-1)) is not: its std at tau = 1 is 29% below the
    schedule's. A sampler step in lambda from tau to tau_next needs only log alpha_bar at both,
    like a DDIM step.
    """

    schedule: Schedule

    def integrated_beta(self, tau) -> jnp.ndarray:
        """lambda(tau) = -log alpha_bar(tau) = the integral of beta from -1 to tau, float32."""
        return -self.schedule.log_alpha_bar(tau)

    def beta(self, tau) -> jnp.ndarray:
        """d lambda / d tau on the cell (i-1, i] that holds tau (the rate of the step i -> i-1)."""
        table = jnp.asarray(self.schedule.log_alphas_cumprod_table, jnp.float32)
        num = self.schedule.num_timesteps
        cell = jnp.clip(jnp.ceil(jnp.asarray(tau, jnp.float32) + 1.0), 1, num).astype(jnp.int32)
        return table[cell - 1] - table[cell]

    def marginal_mean_coeff(self, tau) -> jnp.ndarray:
        """sqrt(alpha_bar(tau)): x_tau = mean_coeff * x_0 + std * noise."""
        return jnp.exp(0.5 * self.schedule.log_alpha_bar(tau))

    def marginal_std(self, tau) -> jnp.ndarray:
        return jnp.sqrt(-jnp.expm1(self.schedule.log_alpha_bar(tau)))


def timestep_grid(steps, num_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Descending (t, t_next) of a respacing spec, float32 (S,), original units, t_next[-1] = -1."""
    t, t_next = step_pairs(space_timesteps(num_timesteps, steps))
    return t.astype(np.float32), t_next.astype(np.float32)


def check_positive(**values):
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name}={value} must be at least 1")


def check_video(name: str, video, ndim: int = 5):
    if np.ndim(video) != ndim:
        want = "(B, K, H, W, C)" if ndim == 5 else "(B, H, W, C)"
        raise ValueError(f"{name} has shape {tuple(np.shape(video))}; expected {want}")
