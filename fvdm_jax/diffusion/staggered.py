"""Staggered schedules: Diffusion Forcing's pyramid and FIFO-Diffusion's rolling diagonal window.

Every schedule returns float32 (S, B, N) `(taus, tau_next)` of original-scale timesteps, as the
schedules of fvdm_jax/diffusion/tasks.py.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from fvdm_jax.diffusion.schedule import check_positive, check_video, timestep_grid

# ----------------------------------------------------------------------------------------------
# Staggered schedules: Diffusion Forcing's pyramid and FIFO-Diffusion's rolling diagonal.
# Levels G = [t_0 = T-1 > ... > t_{S-1} = 0, -1] of a respacing; a frame's progress p says it
# sits at G[p] (p = S: clean). A frame that must wait is given tau = tau_next = T-1 (pure noise,
# not moving); a finished frame tau = tau_next = 0 (shown clean, not moving: DDPM and the SDE/ODE
# samplers keep it exactly, DDIM up to rounding).


def _levels(steps, num_timesteps):
    t, t_next = timestep_grid(steps, num_timesteps)
    return np.append(t, t_next[-1])  # (S + 1,), last -1


def _from_progress(levels, progress):
    """(taus, tau_next) float32 for integer progress (..., N): progress < 0 waits at (T-1, T-1),
    0 <= p < S steps G[p] -> G[p+1], p >= S (finished) rests at (0, 0)."""
    num_levels = levels.shape[0] - 1
    p = np.clip(progress, 0, num_levels - 1)
    waiting, done = progress < 0, progress >= num_levels
    tau, nxt = levels[p], levels[p + 1]
    tau = np.where(waiting, levels[0], np.where(done, levels[num_levels - 1], tau))
    nxt = np.where(waiting, levels[0], np.where(done, levels[num_levels - 1], nxt))
    return tau.astype(np.float32), nxt.astype(np.float32)


def _staggered(levels, progress, batch: int):
    """(taus, tau_next, None), (S', B, N), from integer progress (S', N) shared by the batch."""
    tau, nxt = _from_progress(levels, progress)
    shape = (tau.shape[0], batch, tau.shape[1])
    return np.broadcast_to(tau[:, None], shape).copy(), np.broadcast_to(nxt[:, None], shape).copy(), None


def pyramid(steps, batch: int, num_frames: int, *, delay: int = 1, num_timesteps: int = 1000):
    """Diffusion Forcing's pyramid on one window: frame k starts denoising after k * delay steps
    and walks the whole grid; S + (N - 1) * delay steps in all, every frame ends clean.
    Returns (taus, tau_next, None), (S', B, N)."""
    check_positive(batch=batch, num_frames=num_frames, delay=delay)
    levels = _levels(steps, num_timesteps)
    num_levels = levels.shape[0] - 1
    m = np.arange(num_levels + (num_frames - 1) * delay)[:, None]
    progress = m - delay * np.arange(num_frames)[None, :]  # (S', N)
    return _staggered(levels, progress, batch)


def _levels_per_frame(steps, num_frames, num_timesteps):
    check_positive(num_frames=num_frames)
    levels = _levels(steps, num_timesteps)
    num_levels = levels.shape[0] - 1
    if num_frames < 2 or num_levels % num_frames:
        raise ValueError(
            f"the rolling diagonal needs num_frames >= 2 dividing the {num_levels} levels of "
            f"steps={steps!r}; use steps=a multiple of {num_frames}"
        )
    return levels, num_levels // num_frames


def diagonal(steps, batch: int, num_frames: int, *, num_timesteps: int = 1000):
    """One round of FIFO-Diffusion's rolling diagonal window: (taus, tau_next, None), (d, B, N)
    with d = S / N levels per frame (S must be a multiple of N).

    At round start frame k (0 = oldest) is at progress (N-1-k) * d: frame N-1 is pure noise,
    frame 0 is d steps from clean. After the round's d steps frame 0 is clean; pop it, shift,
    and append a fresh noise frame (see `rolling_generate`): every frame is then exactly where
    the round starts it. Reach the first round's state from noise with `diagonal_warmup`.
    """
    check_positive(batch=batch)
    levels, d = _levels_per_frame(steps, num_frames, num_timesteps)
    j = np.arange(d)[:, None]
    progress = (num_frames - 1 - np.arange(num_frames))[None, :] * d + j  # (d, N)
    tau, nxt = _from_progress(levels, progress)
    shape = (d, batch, num_frames)
    return (
        np.broadcast_to(tau[:, None], shape).copy(),
        np.broadcast_to(nxt[:, None], shape).copy(),
        None,
    )


def diagonal_warmup(steps, batch: int, num_frames: int, *, num_timesteps: int = 1000):
    """From an all-noise window to the start of a `diagonal` round: a pyramid (delay d) cut
    after (N - 1) * d steps. Returns (taus, tau_next, None), ((N-1) d, B, N)."""
    check_positive(batch=batch)
    levels, d = _levels_per_frame(steps, num_frames, num_timesteps)
    m = np.arange((num_frames - 1) * d)[:, None]
    progress = m - d * np.arange(num_frames)[None, :]
    return _staggered(levels, progress, batch)


def rolling_generate(round_fn: Callable, window, num_output_frames: int, new_frame_fn: Callable):
    """Runs a rolling window: returns (B, num_output_frames, H, W, C).

    window (B, N, H, W, C) is in the state a round starts from (after `diagonal_warmup`). Each
    round r: window = round_fn(window, r) (e.g. `sample` over the `diagonal` arrays); frame 0
    (now clean) is emitted; the window shifts by one and new_frame_fn(r) -> (B, H, W, C) (fresh
    noise) is appended as frame N-1.
    """
    check_video("window", window)
    check_positive(num_output_frames=num_output_frames)
    emitted = []
    for r in range(num_output_frames):
        window = round_fn(window, r)
        emitted.append(window[:, 0])
        window = jnp.concatenate([window[:, 1:], jnp.asarray(new_frame_fn(r))[:, None]], axis=1)
    return jnp.stack(emitted, axis=1)
