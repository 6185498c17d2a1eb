"""Per-frame timestep schedules and conditioning for FVDM's tasks (paper section 2.4).

Every task returns `(taus, tau_next, cond)` for `samplers.sample`: taus and tau_next are float32
(S, B, N) arrays of ORIGINAL-scale timesteps (tau_next = -1: the frame ends clean at that step),
built from `space_timesteps` / `step_pairs`, so `steps` is any respacing spec ("50", "ddim50",
"10,20", or an int); cond is a `samplers.Conditioning` (mask (B, N), values (B, N, H, W, C),
policy) or None. Frame indices are 0-based.

Conditioning frames follow tau = m * t, t the generated frames' timestep and m the noise
multiplier (Pusa): m = 0 (the paper) puts them at tau 0 / tau_next -1 at every step; m > 0 walks
them down m * t -> m * t_next and ends them clean with the other frames. What the sampler does
with them is the policy: 'hold' (default) shows them to the model as their clean values (noised
to tau when tau > 0) and keeps them exact; 'replace' is the official sampler (see `Conditioning`).

Long videos: `extend` + `generate_long` (the paper: chunks conditioned on the previous chunk's
last M frames), `pyramid` (Diffusion Forcing's staggered schedule on one window), and
`diagonal` / `diagonal_warmup` / `rolling_generate` (FIFO-Diffusion's rolling diagonal window).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from fvdm_jax.diffusion.gaussian import q_sample
from fvdm_jax.diffusion.samplers import POLICIES, Conditioning
from fvdm_jax.diffusion.schedule import Schedule, space_timesteps, step_pairs


def timestep_grid(steps, num_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Descending (t, t_next) of a respacing spec, float32 (S,), original units, t_next[-1] = -1."""
    t, t_next = step_pairs(space_timesteps(num_timesteps, steps))
    return t.astype(np.float32), t_next.astype(np.float32)


def uniform_schedule(steps, batch: int, num_frames: int, *, num_timesteps: int = 1000):
    """Every frame at the same t: (taus, tau_next), each (S, B, N) float32."""
    _check_positive(batch=batch, num_frames=num_frames)
    t, t_next = timestep_grid(steps, num_timesteps)
    shape = (t.shape[0], batch, num_frames)
    return (
        np.broadcast_to(t[:, None, None], shape).copy(),
        np.broadcast_to(t_next[:, None, None], shape).copy(),
    )


def _check_positive(**values):
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name}={value} must be at least 1")


def _check_indices(indices, num_frames: int, count: int | None = None) -> np.ndarray:
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("conditioning frame indices are empty; give at least one index")
    if ((idx < 0) | (idx >= num_frames)).any():
        raise ValueError(f"frame indices {idx.tolist()} must lie in [0, {num_frames - 1}]")
    if len(set(idx.tolist())) != idx.size:
        raise ValueError(f"frame indices {idx.tolist()} contain duplicates")
    if count is not None and idx.size != count:
        raise ValueError(f"{idx.size} frame indices {idx.tolist()} for {count} given frames")
    return idx


def _check_video(name: str, video, ndim: int = 5):
    if np.ndim(video) != ndim:
        want = "(B, K, H, W, C)" if ndim == 5 else "(B, H, W, C)"
        raise ValueError(f"{name} has shape {tuple(np.shape(video))}; expected {want}")


def condition_frames(
    steps,
    frames,
    indices: Sequence[int],
    num_frames: int,
    *,
    noise_multiplier: float = 0.0,
    policy: str = "hold",
    num_timesteps: int = 1000,
):
    """Generates N frames around K given clean ones. frames (B, K, H, W, C) go to `indices`.

    Returns (taus, tau_next, cond): generated frames follow t, conditioning frames m * t (m = 0:
    tau 0 / tau_next -1 every step). Any-frame conditioning; the other tasks call this.
    """
    _check_video("frames", frames)
    _check_positive(num_frames=num_frames)
    if not 0.0 <= float(noise_multiplier) <= 1.0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must lie in [0, 1]")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {POLICIES}")
    frames = jnp.asarray(frames, jnp.float32)
    batch, count = frames.shape[:2]
    idx = _check_indices(indices, num_frames, count)

    taus, tau_next = uniform_schedule(steps, batch, num_frames, num_timesteps=num_timesteps)
    m = float(noise_multiplier)
    t, t_next = taus[:, :, idx], tau_next[:, :, idx]
    taus[:, :, idx] = m * t
    tau_next[:, :, idx] = -1.0 if m == 0.0 else np.where(t_next < 0, -1.0, m * t_next)

    mask = np.zeros((batch, num_frames), bool)
    mask[:, idx] = True
    values = jnp.zeros((batch, num_frames) + frames.shape[2:], jnp.float32).at[:, idx].set(frames)
    return taus, tau_next, Conditioning(mask=jnp.asarray(mask), values=values, policy=policy)


def generate(steps, batch: int, num_frames: int, *, num_timesteps: int = 1000):
    """Unconditional generation: tau(t) = t for every frame. Returns (taus, tau_next, None)."""
    return (*uniform_schedule(steps, batch, num_frames, num_timesteps=num_timesteps), None)


def any_frame(steps, frames, indices, num_frames: int, **kw):
    """Video from any given frames (B, K, H, W, C) at `indices`; kw as `condition_frames`."""
    return condition_frames(steps, frames, indices, num_frames, **kw)


def i2v(steps, image, num_frames: int, **kw):
    """Image-to-video: image (B, H, W, C) is frame 0 (tau 0, or m * t)."""
    _check_video("image", image, ndim=4)
    return condition_frames(steps, jnp.asarray(image)[:, None], [0], num_frames, **kw)


def interpolate(steps, keyframes, num_frames: int, indices=None, **kw):
    """Interpolation: keyframes (B, K, H, W, C) at `indices` (default: K = 2 at 0 and N-1)."""
    _check_video("keyframes", keyframes)
    if indices is None:
        if np.shape(keyframes)[1] != 2:
            raise ValueError(
                f"interpolate got {np.shape(keyframes)[1]} keyframes without indices; give "
                f"2 (first and last) or pass indices"
            )
        indices = [0, num_frames - 1]
    return condition_frames(steps, keyframes, indices, num_frames, **kw)


def transition(steps, clip_a, clip_b, num_frames: int, overlap: int, **kw):
    """Transition: the last `overlap` frames of clip_a (B, Fa, ...) open the window, the first
    `overlap` frames of clip_b close it, the N - 2 * overlap frames between are generated."""
    _check_video("clip_a", clip_a)
    _check_video("clip_b", clip_b)
    _check_positive(overlap=overlap)
    if 2 * overlap >= num_frames:
        raise ValueError(
            f"transition overlap={overlap} leaves no frame to generate in {num_frames} frames; "
            f"need 2 * overlap < num_frames"
        )
    if min(np.shape(clip_a)[1], np.shape(clip_b)[1]) < overlap:
        raise ValueError(
            f"clips of {np.shape(clip_a)[1]} and {np.shape(clip_b)[1]} frames are shorter than "
            f"overlap={overlap}"
        )
    frames = jnp.concatenate(
        [jnp.asarray(clip_a)[:, -overlap:], jnp.asarray(clip_b)[:, :overlap]], axis=1
    )
    indices = list(range(overlap)) + list(range(num_frames - overlap, num_frames))
    return condition_frames(steps, frames, indices, num_frames, **kw)


def next_frame(steps, context, **kw):
    """Next-frame prediction: context (B, N-1, ...) are frames 0..N-2, frame N-1 is generated."""
    _check_video("context", context)
    count = np.shape(context)[1]
    return condition_frames(steps, context, list(range(count)), count + 1, **kw)


def extend(steps, previous, num_frames: int, overlap: int, **kw):
    """One long-video chunk: the last `overlap` frames of `previous` (B, F, ...) become frames
    0..overlap-1 of an N-frame window; the other N - overlap frames are generated."""
    _check_video("previous", previous)
    if not 0 < overlap < num_frames:
        raise ValueError(f"overlap={overlap} must lie in [1, num_frames - 1 = {num_frames - 1}]")
    if np.shape(previous)[1] < overlap:
        raise ValueError(
            f"previous has {np.shape(previous)[1]} frames, fewer than overlap={overlap}"
        )
    context = jnp.asarray(previous)[:, -overlap:]
    return condition_frames(steps, context, list(range(overlap)), num_frames, **kw)


def generate_long(
    sample_chunk_fn: Callable,
    first_chunk,
    total_frames: int,
    *,
    overlap: int = 8,
    chunk: int | None = None,
):
    """Long video from N-frame windows: returns (B, total_frames, H, W, C).

    first_chunk (B, N, ...) opens the video. Chunk k >= 1 is sample_chunk_fn(context, k) ->
    (B, N, ...), where context (B, overlap, ...) is the previous chunk's output's last `overlap`
    frames (which the chunk holds clean as its frames 0..overlap-1, e.g. via `extend`); its other
    N - overlap frames are appended. 16 + 14 * 8 = 128 frames take 15 chunks of 16 with overlap 8;
    a last chunk that overshoots is cut to total_frames.
    """
    _check_video("first_chunk", first_chunk)
    size = np.shape(first_chunk)[1]
    if chunk is not None and chunk != size:
        raise ValueError(f"chunk={chunk} but first_chunk has {size} frames")
    if not 0 < overlap < size:
        raise ValueError(f"overlap={overlap} must lie in [1, chunk - 1 = {size - 1}]")
    if total_frames < size:
        raise ValueError(f"total_frames={total_frames} is shorter than one chunk of {size}")
    pieces, previous, count, index = [first_chunk], first_chunk, size, 1
    while count < total_frames:
        out = sample_chunk_fn(previous[:, -overlap:], index)
        if tuple(np.shape(out)) != tuple(np.shape(first_chunk)):
            raise ValueError(
                f"sample_chunk_fn returned shape {tuple(np.shape(out))}; expected "
                f"{tuple(np.shape(first_chunk))}"
            )
        pieces.append(out[:, overlap:])
        previous, count, index = out, count + size - overlap, index + 1
    return jnp.concatenate([jnp.asarray(p) for p in pieces], axis=1)[:, :total_frames]


def progressive(
    steps,
    num_frames: int,
    *,
    batch: int | None = None,
    image=None,
    slope: float = 0.1,
    policy: str = "hold",
    num_timesteps: int = 1000,
):
    """Noise that grows with the frame index: tau_i(t) = min(slope * i * t, t), i = 1..N.

    Indexing: the paper's frame i is array frame i - 1, so frame 0 (i = 1) is the least noisy,
    at slope * t, and frames from i = ceil(1 / slope) on follow t. tau_next uses t_next, and -1
    at the last step. With `image` (B, H, W, C) frame 0 is conditioned on it (the paper's i2v
    use) and walks slope * t like a Pusa frame with m = slope. Frames that start below T - 1
    should start from a noised guess, not pure noise: x_T = `start_from(schedule, noise, taus,
    image[:, None])`. Returns (taus, tau_next, cond or None).
    """
    if slope <= 0:
        raise ValueError(f"slope={slope} must be > 0")
    if image is not None:
        _check_video("image", image, ndim=4)
        batch = np.shape(image)[0]
    if batch is None:
        raise ValueError("progressive needs batch=... when no image is given")
    taus, tau_next = uniform_schedule(steps, batch, num_frames, num_timesteps=num_timesteps)
    ramp = slope * np.arange(1, num_frames + 1, dtype=np.float32)  # (N,)
    taus = np.minimum(ramp * taus, taus).astype(np.float32)
    tau_next = np.where(tau_next < 0, -1.0, np.minimum(ramp * tau_next, tau_next))
    tau_next = tau_next.astype(np.float32)
    if image is None:
        return taus, tau_next, None
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {POLICIES}")
    image = jnp.asarray(image, jnp.float32)
    values = jnp.zeros((batch, num_frames) + image.shape[1:], jnp.float32).at[:, 0].set(image)
    mask = np.zeros((batch, num_frames), bool)
    mask[:, 0] = True
    return taus, tau_next, Conditioning(mask=jnp.asarray(mask), values=values, policy=policy)


def start_from(schedule: Schedule, noise, taus, guess=None):
    """x_T for a schedule whose frames start below T - 1: q_sample(guess, taus[0], noise) per
    frame (guess broadcast over frames; zeros when None), pure `noise` where taus[0] = T - 1."""
    noise = jnp.asarray(noise, jnp.float32)
    guess = jnp.zeros_like(noise) if guess is None else jnp.broadcast_to(guess, noise.shape)
    first = jnp.asarray(taus)[0]
    noised = q_sample(schedule, guess, first, noise)
    at_top = (first >= schedule.num_timesteps - 1)[..., None, None, None]
    return jnp.where(at_top, noise, noised)


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


def pyramid(steps, batch: int, num_frames: int, *, delay: int = 1, num_timesteps: int = 1000):
    """Diffusion Forcing's pyramid on one window: frame k starts denoising after k * delay steps
    and walks the whole grid; S + (N - 1) * delay steps in all, every frame ends clean.
    Returns (taus, tau_next, None), (S', B, N)."""
    _check_positive(batch=batch, num_frames=num_frames, delay=delay)
    levels = _levels(steps, num_timesteps)
    num_levels = levels.shape[0] - 1
    m = np.arange(num_levels + (num_frames - 1) * delay)[:, None]
    progress = m - delay * np.arange(num_frames)[None, :]  # (S', N)
    tau, nxt = _from_progress(levels, progress)
    shape = (tau.shape[0], batch, num_frames)
    return (
        np.broadcast_to(tau[:, None], shape).copy(),
        np.broadcast_to(nxt[:, None], shape).copy(),
        None,
    )


def _levels_per_frame(steps, num_frames, num_timesteps):
    _check_positive(num_frames=num_frames)
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
    _check_positive(batch=batch)
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
    _check_positive(batch=batch)
    levels, d = _levels_per_frame(steps, num_frames, num_timesteps)
    m = np.arange((num_frames - 1) * d)[:, None]
    progress = m - d * np.arange(num_frames)[None, :]
    tau, nxt = _from_progress(levels, progress)
    shape = (tau.shape[0], batch, num_frames)
    return (
        np.broadcast_to(tau[:, None], shape).copy(),
        np.broadcast_to(nxt[:, None], shape).copy(),
        None,
    )


def rolling_generate(round_fn: Callable, window, num_output_frames: int, new_frame_fn: Callable):
    """Runs a rolling window: returns (B, num_output_frames, H, W, C).

    window (B, N, H, W, C) is in the state a round starts from (after `diagonal_warmup`). Each
    round r: window = round_fn(window, r) (e.g. `sample` over the `diagonal` arrays); frame 0
    (now clean) is emitted; the window shifts by one and new_frame_fn(r) -> (B, H, W, C) (fresh
    noise) is appended as frame N-1.
    """
    _check_video("window", window)
    _check_positive(num_output_frames=num_output_frames)
    emitted = []
    for r in range(num_output_frames):
        window = round_fn(window, r)
        emitted.append(window[:, 0])
        window = jnp.concatenate([window[:, 1:], jnp.asarray(new_frame_fn(r))[:, None]], axis=1)
    return jnp.stack(emitted, axis=1)
