"""Sampling the Wan 2.1 DiT with per-frame flow-matching levels and Pusa's conditioning.

`WanSampler` runs the rectified flow of fvdm_jax/diffusion/flow.py with the Wan model
(fvdm_jax/models/wan.py): every latent frame follows Wan's inference grid
(`FlowSchedule.inference_sigmas(num_steps)`) except the given ones, which sit at sigma * m (Pusa's
noise multiplier m; 0 keeps them exactly clean through every step). The Euler steps are one
`lax.scan` (`flow.euler_sample`), text classifier-free guidance (`flow.text_guided`) one batched
model call per step. The program is jitted once per shape (batch, frames, latent size, text
length): which frames are given, and m, are data, so every task of one shape shares it.

Tasks and their model_inputs (B, K, h, w, C), latents in model space:
  generate     no inputs.
  i2v          K = 1: frame 0.
  interpolate  K = 2: frames 0 and F-1, or K = len(frame_indices) at those frames.
  any_frame    K = len(frame_indices) frames at frame_indices (required).
  extend       K < F: the first K frames of the window (continues a clip).
  transition   K = 2 o < F: the last o frames of clip A at frames 0..o-1, the first o of clip B
               at F-o..F-1; the frames between are generated.

The batch is padded to a multiple of the mesh's batch split (the padding is cut off), inputs are
sharded over the batch, parameters placed on their logical shardings. Each video's starting noise
comes from fold_in(rng, its index), so a video does not depend on the batch it is sampled in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.diffusion import flow
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.build import model_from_config
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.sampling.weights import unwrap_params

TASKS = ("generate", "i2v", "interpolate", "any_frame", "extend", "transition")


def _abstract_params(model, mesh, rules):
    """(abstract {'params': ...} with shardings, their NamedShardings) of a Wan model: nothing is
    allocated (training/state.py's init is the Latte DiT's)."""
    _, ph, pw = model.patch_size
    args = (jnp.zeros((1, 1, ph, pw, model.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 1, model.text_dim)))
    boxed = jax.eval_shape(model.init, jax.random.key(0), *args)
    shardings = shd.logical_shardings(boxed, mesh, rules)
    init = jax.jit(lambda r: nn.unbox(model.init(r, *args)), out_shardings=shardings)
    abstract = init.eval_shape(jax.random.key(0))
    return unwrap_params(abstract), unwrap_params(shardings)


def _noise(rng, batch: int, shape: tuple) -> jnp.ndarray:
    """(batch,) + shape normal noise, video i from fold_in(rng, i)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


_noise_jit = jax.jit(_noise, static_argnums=(1, 2))


class WanSampler:
    """Samples Pusa's tasks with a Wan model on a mesh; compiles once per shape.

    model_config: the Wan `model` section (wan_model_config); schedule: the `FlowSchedule`; mesh
    and rules: where the batch and the parameters live; params: {'params': ...} or the bare tree
    (may also be given per `run`). num_steps: Euler steps; cfg_scale: text guidance (1 = none);
    noise_multiplier: Pusa's m in [0, 1] for the given frames. num_frames (latent frames; Wan's
    81 video frames are 21) and latent_hw: the window `run` samples unless told otherwise.
    """

    def __init__(self, model_config: Mapping[str, Any], schedule: flow.FlowSchedule, *, mesh,
                 rules, params=None, num_steps: int = 50, cfg_scale: float = 5.0,
                 noise_multiplier: float = 0.0, num_frames: int = 21,
                 latent_hw: tuple[int, int] = (60, 104)):
        self.model_config = dict(model_config)
        if (self.model_config.get("architecture") or "dit") != "wan":
            raise ConfigError(f"WanSampler needs a Wan model config (model.architecture='wan'), "
                              f"got {self.model_config.get('architecture')!r}")
        self.model = model_from_config(self.model_config)
        self.schedule = schedule
        self.mesh, self.rules = mesh, rules
        self.divisor = shd.batch_divisor(mesh, rules)
        self.num_steps = int(num_steps)
        if self.num_steps < 1:
            raise ConfigError(f"num_steps={num_steps} must be >= 1")
        self.cfg_scale = float(cfg_scale)
        if not math.isfinite(self.cfg_scale):
            raise ConfigError(f"cfg_scale={cfg_scale} must be a finite number")
        self.noise_multiplier = float(noise_multiplier)
        if not 0.0 <= self.noise_multiplier <= 1.0:
            raise ConfigError(f"noise_multiplier={noise_multiplier} (Pusa's m) must lie in [0, 1]")
        self.num_frames, self.latent_hw = int(num_frames), tuple(int(v) for v in latent_hw)
        self.channels, self.text_dim = self.model.in_channels, self.model.text_dim
        self.abstract_params, self.param_shardings = _abstract_params(self.model, mesh, rules)
        self._program = jax.jit(self._sample)
        self.params = None if params is None else self.place_params(params)

    # --- placement ------------------------------------------------------------------------------
    def place_params(self, params):
        """Puts parameters onto their logical shardings."""
        return jax.device_put(unwrap_params(params), self.param_shardings)

    def padded(self, batch: int) -> int:
        """The batch a run of `batch` videos computes: a multiple of the mesh's batch split."""
        return math.ceil(int(batch) / self.divisor) * self.divisor

    def compilations(self) -> int:
        """How many sampling programs have been compiled (one per distinct shape)."""
        return self._program._cache_size()

    def _sharding(self, ndim: int, axis: int = 0):
        spec = [None] * ndim
        spec[axis] = shd.batch_sharding(self.mesh, self.rules, 1).spec[0]
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

    def _sharded(self, array, axis: int = 0):
        return jax.device_put(jnp.asarray(array), self._sharding(np.ndim(array), axis))

    # --- the program ----------------------------------------------------------------------------
    def _sample(self, params, noise, clean, frames, sigmas, contexts):
        """The whole run: start latents, then the Euler scan over sigmas (S + 1, B, F)."""
        def apply(x, t, context):
            return self.model.apply(params, x, t, context)

        guided = flow.text_guided(apply, self.cfg_scale)
        x = flow.start_latents(clean, frames, sigmas[0], noise)
        return flow.euler_sample(lambda x, t: guided(x, t, contexts), self.schedule, x, sigmas)

    def levels(self, frames) -> np.ndarray:
        """(S + 1, B, F) levels: Wan's inference grid, the given frames (mask (B, F)) at sigma * m."""
        return flow.condition_sigmas(self.schedule.inference_sigmas(self.num_steps), frames,
                                     self.noise_multiplier)

    def lower(self, task: str = "generate", batch: int = 1, *, num_frames: int | None = None,
              latent_hw: Sequence[int] | None = None, context_len: int = 512):
        """The sampling program for `batch` videos lowered on abstract parameters and inputs with
        their shardings (nothing is allocated; --mode=compile compiles it). Every task of one
        shape runs this program (the given frames are data)."""
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; the Wan sampler runs {TASKS}")
        f, (h, w) = self._window(num_frames, latent_hw)
        b = self.padded(batch)

        def abstract(shape, dtype, axis=0):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self._sharding(len(shape), axis))

        params = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_params, self.param_shardings)
        video = abstract((b, f, h, w, self.channels), jnp.float32)
        context = abstract((b, int(context_len), self.text_dim), jnp.float32)
        contexts = (context, context if self.cfg_scale != 1.0 else None)
        with shd.activation_context(self.mesh, self.rules):
            return self._program.lower(
                params, video, video, abstract((b, f), jnp.bool_),
                abstract((self.num_steps + 1, b, f), jnp.float32, 1), contexts)

    # --- checks ---------------------------------------------------------------------------------
    def _window(self, num_frames, latent_hw) -> tuple[int, tuple[int, int]]:
        f = self.num_frames if num_frames is None else int(num_frames)
        hw = self.latent_hw if latent_hw is None else tuple(int(v) for v in latent_hw)
        _, ph, pw = self.model.patch_size
        if f < 1 or len(hw) != 2 or hw[0] % ph or hw[1] % pw or min(hw) < 1:
            raise ConfigError(f"num_frames={f}, latent_hw={hw}: need >= 1 frame and a latent size "
                              f"divisible by the patch {ph} x {pw}")
        return f, hw

    def _frames(self, task: str, k: int | None, frame_indices, f: int) -> list[int]:
        """The frame positions of the K given frames of `task` (one-line errors)."""
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; the Wan sampler runs {TASKS}")
        if task == "generate":
            if k is not None or frame_indices is not None:
                raise ConfigError("task generate takes no model_inputs or frame_indices")
            return []
        if k is None:
            raise ConfigError(f"task {task} needs model_inputs (B, K, h, w, C)")
        if frame_indices is not None:
            if task in ("i2v", "extend", "transition"):
                raise ConfigError(f"task {task} fixes its frames; frame_indices is for "
                                  f"interpolate / any_frame")
            indices = [int(i) for i in frame_indices]
        elif task == "any_frame":
            raise ConfigError("task any_frame needs frame_indices")
        elif task == "i2v":
            indices = [0]
        elif task == "transition":
            if k % 2 or not 0 < k < f:
                raise ConfigError(f"task transition: K = {k} given frames must be 2 o (o of each "
                                  f"clip) with 2 o < F = {f}")
            indices = list(range(k // 2)) + list(range(f - k // 2, f))
        elif task == "interpolate":
            if k != 2:
                raise ConfigError(f"task interpolate with K = {k} given frames needs "
                                  f"frame_indices (K = 2 means frames 0 and F-1)")
            indices = [0, f - 1]
        else:  # extend
            if not 0 < k < f:
                raise ConfigError(f"task extend: K = {k} given frames must lie in [1, F - 1 = "
                                  f"{f - 1}] (frames to generate must remain)")
            indices = list(range(k))
        bad = [i for i in indices if not 0 <= i < f]
        if bad:
            raise ConfigError(f"frame_indices {bad} lie outside [0, F - 1 = {f - 1}]")
        if len(set(indices)) != len(indices):
            raise ConfigError(f"frame_indices {indices} hold duplicates")
        if len(indices) != k:
            raise ConfigError(f"model_inputs hold K = {k} frames but {len(indices)} frame indices "
                              f"{indices} are given (task {task})")
        return indices

    def _context(self, context, batch: int, name: str) -> jnp.ndarray:
        shape = tuple(np.shape(context))
        if len(shape) != 3 or shape[-1] != self.text_dim or shape[0] not in (1, batch):
            raise ConfigError(f"{name} has shape {shape}; expected (B = {batch} or 1, L, "
                              f"model.text_dim = {self.text_dim})")
        context = jnp.asarray(context, jnp.float32)
        return jnp.broadcast_to(context, (batch,) + shape[1:])

    # --- running --------------------------------------------------------------------------------
    def run(self, task: str, rng, *, context, null_context=None, model_inputs=None,
            frame_indices: Sequence[int] | None = None, batch_size: int | None = None,
            num_frames: int | None = None, latent_hw: Sequence[int] | None = None,
            noise=None, params=None) -> np.ndarray:
        """Samples `task` for one batch: host float32 latents (B, F, h, w, C) in model space.

        context (B or 1, L, text_dim) text tokens; null_context likewise (the negative prompt;
        required when cfg_scale != 1; the shorter of the two is zero-padded to the longer, as Wan
        pads its text to a fixed length). model_inputs (B, K, h, w, C): the given frames (see the
        module docstring); frame_indices their positions (interpolate, any_frame). batch_size: B
        without inputs (default: the context's B). noise (B, F, h, w, C): the starting noise
        (default: from rng). params: overrides the sampler's parameters for this call.
        """
        f, (h, w) = self._window(num_frames, latent_hw)
        k = None
        if model_inputs is not None:
            k = int(np.shape(model_inputs)[1]) if np.ndim(model_inputs) == 5 else 0
        if k is not None and (k < 1 or np.shape(model_inputs)[2:] != (h, w, self.channels)):
            raise ConfigError(f"model_inputs have shape {tuple(np.shape(model_inputs))}; expected "
                              f"(B, K, h, w, C) = (B, K, {h}, {w}, {self.channels})")
        indices = self._frames(task, k, frame_indices, f)
        batch = self._batch(model_inputs, batch_size, context)
        if self.cfg_scale != 1.0 and null_context is None:
            raise ConfigError(f"cfg_scale={self.cfg_scale} needs null_context (the negative "
                              f"prompt's tokens), or set cfg_scale=1")
        context = self._context(context, batch, "context")
        null = None
        if self.cfg_scale != 1.0:
            null = self._context(null_context, batch, "null_context")
            length = max(context.shape[1], null.shape[1])
            pad = lambda c: jnp.pad(c, ((0, 0), (0, length - c.shape[1]), (0, 0)))  # noqa: E731
            context, null = pad(context), pad(null)
        params = self.params if params is None else self.place_params(params)
        if params is None:
            raise ConfigError("WanSampler has no parameters: pass params=...")
        shape = (f, h, w, self.channels)
        padded = self.padded(batch)
        if noise is None:
            noise = _noise_jit(rng, padded, shape)
        elif tuple(np.shape(noise)) != (batch,) + shape:
            raise ConfigError(f"noise has shape {tuple(np.shape(noise))}; expected "
                              f"{(batch,) + shape}")
        clean = np.zeros((batch,) + shape, np.float32)
        frames = np.zeros((batch, f), bool)
        if indices:
            clean[:, indices] = np.asarray(model_inputs, np.float32)
            frames[:, indices] = True

        def pad_batch(a):
            a = jnp.asarray(a)
            if a.shape[0] == padded:
                return a
            return jnp.concatenate([a, jnp.repeat(a[-1:], padded - a.shape[0], axis=0)])

        sigmas = self.levels(np.asarray(pad_batch(frames)))
        inputs = [self._sharded(pad_batch(a)) for a in (noise, clean, frames)]
        contexts = tuple(None if c is None else self._sharded(pad_batch(c)) for c in (context, null))
        # Always under the context: the trace cache keys on the mesh, not on flax's rules.
        with shd.activation_context(self.mesh, self.rules):
            out = self._program(params, *inputs, self._sharded(sigmas, 1), contexts)
        out = out[:batch]
        if jax.process_count() > 1:  # a global array spans other hosts' devices: gather it
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        return np.asarray(jax.device_get(out), np.float32)

    def _batch(self, model_inputs, batch_size, context) -> int:
        if model_inputs is not None:
            batch = int(np.shape(model_inputs)[0])
            if batch_size is not None and int(batch_size) != batch:
                raise ConfigError(f"batch_size={batch_size} differs from the {batch} videos of "
                                  f"model_inputs")
            return batch
        if batch_size is not None:
            return int(batch_size)
        return int(np.shape(context)[0]) if np.ndim(context) == 3 else 1
