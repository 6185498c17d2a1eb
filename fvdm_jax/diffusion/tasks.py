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
to tau when tau > 0) and keeps them exact; 'replace' is the paper's form, as the official
long-video loop; 'released' is the released i2v / interpolation scripts' form: the given frames
are written into x_T and labelled t like every other frame (no m), so the schedule is the
uniform one (see `Conditioning`).

`TASKS` (the registry at the end) names every task with its inputs and its schedule builder.

Long videos: `extend` + `generate_long` (the paper: chunks conditioned on the previous chunk's
last M frames), `pyramid` (Diffusion Forcing's staggered schedule on one window), and
`diagonal` / `diagonal_warmup` / `rolling_generate` (FIFO-Diffusion's rolling diagonal window).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from fvdm_jax.diffusion.gaussian import q_sample
from fvdm_jax.diffusion.samplers import POLICIES, Conditioning
from fvdm_jax.diffusion.schedule import Schedule, check_positive, check_video, timestep_grid
from fvdm_jax.diffusion.staggered import pyramid


def uniform_schedule(steps, batch: int, num_frames: int, *, num_timesteps: int = 1000):
    """Every frame at the same t: (taus, tau_next), each (S, B, N) float32."""
    check_positive(batch=batch, num_frames=num_frames)
    t, t_next = timestep_grid(steps, num_timesteps)
    shape = (t.shape[0], batch, num_frames)
    return (
        np.broadcast_to(t[:, None, None], shape).copy(),
        np.broadcast_to(t_next[:, None, None], shape).copy(),
    )


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
    tau 0 / tau_next -1 every step), or t like the others under policy 'released'. Any-frame
    conditioning; the other tasks call this.
    """
    check_video("frames", frames)
    check_positive(num_frames=num_frames)
    if not 0.0 <= float(noise_multiplier) <= 1.0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must lie in [0, 1]")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {POLICIES}")
    if policy == "released" and float(noise_multiplier) != 0.0:
        raise ValueError(
            f"noise_multiplier={noise_multiplier} has no meaning under policy 'released' (the "
            f"given frames are labelled t like the others); use 0, or policy 'hold' / 'replace'"
        )
    frames = jnp.asarray(frames, jnp.float32)
    batch, count = frames.shape[:2]
    idx = _check_indices(indices, num_frames, count)

    taus, tau_next = uniform_schedule(steps, batch, num_frames, num_timesteps=num_timesteps)
    m = float(noise_multiplier)
    if policy != "released":
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
    check_video("image", image, ndim=4)
    return condition_frames(steps, jnp.asarray(image)[:, None], [0], num_frames, **kw)


def interpolate(steps, keyframes, num_frames: int, indices=None, **kw):
    """Interpolation: keyframes (B, K, H, W, C) at `indices` (default: K = 2 at 0 and N-1)."""
    check_video("keyframes", keyframes)
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
    check_video("clip_a", clip_a)
    check_video("clip_b", clip_b)
    check_positive(overlap=overlap)
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
    check_video("context", context)
    count = np.shape(context)[1]
    return condition_frames(steps, context, list(range(count)), count + 1, **kw)


def extend(steps, previous, num_frames: int, overlap: int, **kw):
    """One long-video chunk: the last `overlap` frames of `previous` (B, F, ...) become frames
    0..overlap-1 of an N-frame window; the other N - overlap frames are generated."""
    check_video("previous", previous)
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

    first_chunk (B, K, ...) opens the video (K = chunk = N by default; with `chunk` = N given,
    any K >= overlap, e.g. a short real clip). Chunk k >= 1 is sample_chunk_fn(context, k) ->
    (B, N, ...), where context (B, overlap, ...) is the previous chunk's last `overlap` frames
    (which the chunk holds clean as its frames 0..overlap-1, e.g. via `extend`); its other
    N - overlap frames are appended. 16 + 14 * 8 = 128 frames take 15 chunks of 16 with overlap 8;
    a last chunk that overshoots is cut to total_frames.
    """
    check_video("first_chunk", first_chunk)
    opening = np.shape(first_chunk)[1]
    size = opening if chunk is None else int(chunk)
    if chunk is None and opening < 2:
        raise ValueError(f"first_chunk has {opening} frames; pass chunk=N for a short opening")
    if not 0 < overlap < size:
        raise ValueError(f"overlap={overlap} must lie in [1, chunk - 1 = {size - 1}]")
    if opening < overlap:
        raise ValueError(f"the opening has {opening} frames, fewer than overlap={overlap}")
    if total_frames < size:
        raise ValueError(f"total_frames={total_frames} is shorter than one chunk of {size}")
    want = (np.shape(first_chunk)[0], size) + tuple(np.shape(first_chunk)[2:])
    pieces, previous, count, index = [first_chunk], first_chunk, opening, 1
    while count < total_frames:
        out = sample_chunk_fn(previous[:, -overlap:], index)
        if tuple(np.shape(out)) != want:
            raise ValueError(f"sample_chunk_fn returned shape {tuple(np.shape(out))}; expected {want}")
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
        check_video("image", image, ndim=4)
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
    if policy == "released":
        raise ValueError(
            "progressive gives frame 0 its own ramp (slope * t); policy 'released' labels the "
            "given frame like the others: use policy 'hold' or 'replace'"
        )
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
# The task registry: the one place that knows every task's name, its inputs and its schedule.
# The sampler, the sampling job and evaluation all read it.


@dataclasses.dataclass(frozen=True)
class Window:
    """What one N-frame window of a task is built from (clips in model space, (B, K, ...))."""

    steps: Any  # a respacing spec
    batch: int
    num_frames: int
    num_timesteps: int
    clips: Any = None
    frame_indices: Sequence[int] | None = None
    noise_multiplier: float = 0.0
    policy: str = "hold"
    slope: float = 0.1
    delay: int = 1

    @property
    def conditioning(self) -> dict:
        return dict(noise_multiplier=self.noise_multiplier, policy=self.policy,
                    num_timesteps=self.num_timesteps)


@dataclasses.dataclass(frozen=True)
class Task:
    """name; inputs: 'none' | 'required' | 'optional'; long: the output has sample.total_frames
    frames (driven window by window); evaluation: how FVD feeds it real clips ('none': sampled
    from noise, 'window': the real clip of the model's window, 'context': its first overlap
    frames; None: not evaluated); default_overlap(N) for the tasks that have one; build(Window) ->
    (taus, tau_next, cond, guess) for single-window tasks; noised_start: its frames start below
    T - 1, so x_T is `start_from(schedule, noise, taus, guess)` (guess: the clean estimate they
    are noised from, None: zeros), else pure noise."""

    name: str
    inputs: str = "none"
    long: bool = False
    evaluation: str | None = None
    default_overlap: Callable[[int], int] | None = None
    build: Callable[[Window], tuple] | None = None
    noised_start: bool = False

    @property
    def needs_inputs(self) -> bool:
        return self.inputs == "required"

    @property
    def takes_inputs(self) -> bool:
        return self.inputs != "none"

    def overlap(self, num_frames: int, given: int | None = None) -> int:
        if given:
            return int(given)
        if self.default_overlap is None:
            raise ValueError(f"task {self.name} has no overlap")
        return int(self.default_overlap(num_frames))


def keyframes(clips, indices, num_frames: int, task: str):
    """(frames (B, K', ...), indices) for interpolate / any_frame: K = N clips are taken at the
    indices (default first and last), K = len(indices) clips are the keyframes in order."""
    if indices is None:
        if task == "any_frame":
            raise ValueError("task any_frame needs sample.frame_indices, e.g. '0,4'")
        indices = [0, num_frames - 1]
    indices = [int(i) for i in indices]
    k = np.shape(clips)[1]
    if k == num_frames:
        return clips[:, np.asarray(indices)], indices
    if k == len(indices):
        return clips, indices
    raise ValueError(f"{task} got {k} input frames for keyframes {indices}: give a {num_frames}-"
                     f"frame video or exactly {len(indices)} frames (images)")


def _build_generate(w: Window):
    return (*generate(w.steps, w.batch, w.num_frames, num_timesteps=w.num_timesteps), None)


def _build_pyramid(w: Window):
    return (*pyramid(w.steps, w.batch, w.num_frames, delay=w.delay, num_timesteps=w.num_timesteps),
            None)


def _build_i2v(w: Window):
    return (*i2v(w.steps, w.clips[:, 0], w.num_frames, **w.conditioning), None)


def _build_keyframes(name):
    def build(w: Window):
        frames, indices = keyframes(w.clips, w.frame_indices, w.num_frames, name)
        return (*any_frame(w.steps, frames, indices, w.num_frames, **w.conditioning), None)

    return build


def _build_transition(w: Window):
    overlap = np.shape(w.clips)[1] // 2
    if np.shape(w.clips)[1] != 2 * overlap or overlap == 0:
        raise ValueError(f"transition inputs have {np.shape(w.clips)[1]} frames; need 2 * overlap "
                         f"(the end of clip A, then the start of clip B)")
    a, b = w.clips[:, :overlap], w.clips[:, overlap:]
    return (*transition(w.steps, a, b, w.num_frames, overlap, **w.conditioning), None)


def _build_next_frame(w: Window):
    n = w.num_frames
    if np.shape(w.clips)[1] < n - 1:
        raise ValueError(f"next_frame needs {n - 1} context frames, got {np.shape(w.clips)[1]}")
    return (*next_frame(w.steps, w.clips[:, : n - 1], **w.conditioning), None)


def _build_progressive(w: Window):
    image = None if w.clips is None else w.clips[:, 0]
    taus, nxt, cond = progressive(w.steps, w.num_frames, batch=w.batch, image=image, slope=w.slope,
                                  policy=w.policy, num_timesteps=w.num_timesteps)
    return taus, nxt, cond, None if image is None else image[:, None]


TASKS = {task.name: task for task in (
    Task("generate", evaluation="none", build=_build_generate),
    Task("i2v", inputs="required", evaluation="window", build=_build_i2v),
    Task("interpolate", inputs="required", evaluation="window", build=_build_keyframes("interpolate")),
    Task("any_frame", inputs="required", build=_build_keyframes("any_frame")),
    Task("transition", inputs="required", default_overlap=lambda n: max(1, n // 4),
         build=_build_transition),
    Task("next_frame", inputs="required", build=_build_next_frame),
    Task("extend", inputs="optional", long=True, evaluation="context",
         default_overlap=lambda n: n // 2),
    Task("progressive", inputs="optional", build=_build_progressive, noised_start=True),
    Task("pyramid", build=_build_pyramid),
    Task("rolling", long=True),
)}
TASK_NAMES = tuple(TASKS)
EVAL_TASKS = tuple(name for name, task in TASKS.items() if task.evaluation is not None)


def get_task(name: str) -> Task:
    """The registry entry of `name`, or a one-line error listing the tasks."""
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not one of {list(TASKS)}")
    return TASKS[name]
