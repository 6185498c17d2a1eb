"""Sampling: every zero-shot task of FVDM from one trained model, on the device mesh.

`VideoSampler` turns a task name into its per-frame schedule (diffusion/tasks.py), runs it as one
jitted `lax.scan` (diffusion/samplers.py) with the batch sharded over the mesh, and returns pixels
(VAE-decoded for latent models). `sample_job` is `--mode=sample`: mass generation in fixed-size
batches (one compilation), each batch a function of (seed, batch index) written atomically, so an
interrupted job resumes where it stopped; MP4 / GIF per video, a PNG contact sheet per batch, and
`samples.npz` for evaluation. `TrainingSamples` writes a few videos per task during training.

Tasks and what their inputs (B, K, H, W, 3) mean (pixels in [-1, 1]; model-space clips via
`model_inputs`):
  generate     no inputs.
  i2v          inputs[:, 0] is frame 0 (tau_1 = 0).
  interpolate  keyframes at sample.frame_indices (default first and last): K = N takes them from
               those positions, K = number of keyframes gives them in order (2: frames 0 and N-1).
  any_frame    like interpolate; sample.frame_indices is required.
  transition   K = 2 * overlap: the end of clip A then the start of clip B; the frames between
               are generated.
  next_frame   inputs[:, :N-1] are frames 0..N-2; frame N-1 is predicted.
  extend       long video of sample.total_frames: with inputs (K >= overlap) the video opens with
               them, without, chunk 0 is generated; every next chunk holds the previous chunk's
               last `overlap` frames clean (16 + 14 * 8 = 128 frames: 15 chunks).
  progressive  tau_i(t) = min(slope * i * t, t); with inputs frame 0 is inputs[:, 0].
  pyramid      Diffusion Forcing's staggered pyramid on one window (no inputs).
  rolling      FIFO-Diffusion's rolling diagonal window to sample.total_frames (no inputs;
               sample.num_steps must be a multiple of N).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax import media
from fvdm_jax import sharding as shd
from fvdm_jax.diffusion import tasks
from fvdm_jax.diffusion.gaussian import eps_output
from fvdm_jax.diffusion.samplers import POLICIES, SAMPLERS, cfg_model_fn, make_sampler
from fvdm_jax.diffusion.schedule import Schedule
from fvdm_jax.models.dit import model_from_config

SAMPLE_KEYS = (
    "task", "sampler", "num_steps", "eta", "clip_denoised", "cfg_scale", "labels", "num_videos",
    "batch_size", "seed", "policy", "noise_multiplier", "inputs", "frame_indices", "overlap",
    "total_frames", "slope", "delay", "checkpoint", "output_dir", "fps", "save_media",
    "every_steps", "train_tasks", "train_num_videos", "sheet_frame_size",
)
TASKS = (
    "generate", "i2v", "interpolate", "any_frame", "transition", "next_frame", "extend",
    "progressive", "pyramid", "rolling",
)
NEEDS_INPUTS = ("i2v", "interpolate", "any_frame", "transition", "next_frame")
TAKES_INPUTS = NEEDS_INPUTS + ("extend", "progressive")
LONG_TASKS = ("extend", "rolling")
DATA_INPUTS = "data"  # sample.inputs value: clips of config.data, also for extend / progressive


def parse_ints(text, name: str) -> list[int] | None:
    """'0,7,15' -> [0, 7, 15]; None / '' -> None."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return [int(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"sample.{name}={text!r} must be comma-separated integers") from None


def validate_sample_config(sample: Mapping[str, Any], model: Mapping[str, Any]) -> None:
    """One-line errors for bad sample settings (before anything is loaded)."""
    unknown = sorted(set(sample.keys()) - set(SAMPLE_KEYS))
    if unknown:
        raise ValueError(f"unknown sample config keys {unknown}; known keys: {list(SAMPLE_KEYS)}")
    for key, allowed in (("task", TASKS), ("sampler", SAMPLERS), ("policy", POLICIES)):
        if sample[key] not in allowed:
            raise ValueError(f"sample.{key}={sample[key]!r} is not one of {list(allowed)}")
    bad_tasks = [t for t in sample["train_tasks"] if t not in TASKS]
    if bad_tasks:
        raise ValueError(f"sample.train_tasks has unknown tasks {bad_tasks}; known: {list(TASKS)}")
    for key in ("num_steps", "num_videos", "batch_size", "total_frames", "fps", "delay",
                "train_num_videos"):
        if int(sample[key]) <= 0:
            raise ValueError(f"sample.{key}={sample[key]} must be positive")
    if float(sample["eta"]) < 0 or float(sample["slope"]) <= 0:
        raise ValueError(f"sample.eta={sample['eta']} must be >= 0 and sample.slope > 0")
    if not 0.0 <= float(sample["noise_multiplier"]) <= 1.0:
        raise ValueError(f"sample.noise_multiplier={sample['noise_multiplier']} must lie in [0, 1]")
    num_frames = int(model["num_frames"])
    overlap = sample.get("overlap")
    if overlap is not None and not 0 < int(overlap) < num_frames:
        raise ValueError(f"sample.overlap={overlap} must lie in [1, model.num_frames - 1]")
    for index in parse_ints(sample.get("frame_indices"), "frame_indices") or []:
        if not 0 <= index < num_frames:
            raise ValueError(
                f"sample.frame_indices has {index}, outside [0, model.num_frames - 1 = "
                f"{num_frames - 1}]"
            )
    labels = parse_ints(sample.get("labels"), "labels")
    num_classes = int(model.get("num_classes") or 0)
    if labels and (num_classes == 0 or min(labels) < 0 or max(labels) >= num_classes):
        raise ValueError(
            f"sample.labels={sample['labels']!r} needs a class-conditional model with labels in "
            f"[0, {num_classes - 1}] (model.num_classes={num_classes})"
        )


def _unwrap(params):
    """{'params': tree} or the bare tree -> {'params': tree}."""
    if params is None:
        return None
    return params if set(params.keys()) == {"params"} else {"params": params}


class VideoSampler:
    """Samples any task with one model on a mesh; compiles once per (task shape, batch size).

    config: the full config (model, diffusion, sample, vae, mesh; model/diffusion can be
    overridden by `model_config` / `diffusion_config`, e.g. from an inference checkpoint).
    params: {'params': ...} or the bare tree (EMA weights); may also be given per `run`.
    """

    def __init__(self, config, params=None, *, mesh=None, model_config=None,
                 diffusion_config=None):
        self.config = config
        self.model_config = dict(model_config or config.model)
        self.sample_config = config.sample
        validate_sample_config(self.sample_config, self.model_config)
        self.model = model_from_config(self.model_config)
        self.schedule = Schedule.from_config(diffusion_config or config.diffusion)
        self.mesh = mesh if mesh is not None else shd.make_mesh(config.mesh)
        self.rules = shd.rules_from_config(config.mesh)
        self.divisor = shd.batch_divisor(self.mesh, self.rules)
        m = self.model_config
        self.num_frames = int(m["num_frames"])
        self.input_size = int(m["input_size"])
        self.channels = int(m["in_channels"])
        self.num_classes = int(m.get("num_classes") or 0)
        self.vae_checkpoint = (config.get("vae") or {}).get("checkpoint")
        if config.data.get("source") == "latents" and not self.vae_checkpoint:
            raise ValueError(
                "the model samples VAE latents (data.source='latents'); set vae.checkpoint to "
                "the diffusers AutoencoderKL folder that decodes them"
            )
        self._vae = None
        s = self.sample_config
        self.steps = int(s.num_steps)
        self.cfg_scale = float(s.cfg_scale)
        self._sample_fn = make_sampler(
            self._model_fn, self.schedule, sampler=s.sampler, eta=float(s.eta),
            clip_denoised=bool(s.clip_denoised),
        )
        boxed = _boxed_params(self.model, m)
        self.param_shardings = shd.logical_shardings(boxed, self.mesh, self.rules)
        self.params = None if params is None else self.place_params(params)

    # --- shapes, placement --------------------------------------------------------------------
    @property
    def pixel_shape(self) -> tuple[int, int, int, int]:
        """(F, H, W, 3) of one output window in pixels."""
        size = self.input_size * (self._vae_model().downsample_factor if self.vae_checkpoint else 1)
        return self.num_frames, size, size, 3

    def place_params(self, params):
        """Puts parameters onto their logical shardings (a no-op for training's EMA params)."""
        return jax.device_put(_unwrap(params), self.param_shardings)

    def compilations(self) -> int:
        """How many programs the scan sampler has compiled (one per distinct shape)."""
        return self._sample_fn._cache_size()

    def _batch_sharded(self, array, axis: int = 0):
        spec = [None] * np.ndim(array)
        spec[axis] = shd.batch_sharding(self.mesh, self.rules, 1).spec[0]
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))
        return jax.device_put(jnp.asarray(array), sharding)

    # --- the model ----------------------------------------------------------------------------
    def _model_fn(self, args, x, tau):
        params, labels = args

        def apply(x, tau, labels):
            return self.model.apply(params, x, tau, labels if self.num_classes else None)

        if self.num_classes and self.cfg_scale != 1.0:
            out = cfg_model_fn(apply, labels, self.num_classes, self.cfg_scale, self.channels)(
                x, tau
            )
        else:
            out = apply(x, tau, labels)
        # Guidance is linear in the prediction at a fixed x, so it commutes with this conversion.
        return eps_output(self.schedule, out, x, tau)

    def _vae_model(self):
        if self._vae is None:
            from fvdm_jax.convert.diffusers_vae import load_diffusers_vae
            from fvdm_jax.models.dit import DTYPES

            vae_cfg = self.config.vae
            vae, params = load_diffusers_vae(
                vae_cfg.checkpoint, dtype=DTYPES[vae_cfg.get("dtype", "float32")]
            )
            if vae_cfg.get("scale_factor"):
                vae = vae.clone(scaling_factor=float(vae_cfg.scale_factor))
            self._vae = vae
            self._vae_params = jax.device_put(params, jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec()))
            from fvdm_jax.models.vae import decode_video, encode_video

            self._decode = jax.jit(lambda p, z: decode_video(vae, p, z))
            self._encode = jax.jit(lambda p, x: encode_video(vae, p, x))
        return self._vae

    def to_model_space(self, pixels):
        """Pixels (B, K, H, W, 3) in [-1, 1] -> model inputs (VAE posterior mean x scale)."""
        pixels = jnp.asarray(pixels, jnp.float32)
        if not self.vae_checkpoint:
            return pixels
        self._vae_model()
        batch = pixels.shape[0]
        padded = math.ceil(batch / self.divisor) * self.divisor  # the mesh splits the batch evenly
        if padded != batch:
            pixels = jnp.concatenate([pixels, jnp.repeat(pixels[-1:], padded - batch, 0)])
        return self._encode(self._vae_params, self._batch_sharded(pixels))[:batch]

    def to_pixels(self, videos) -> np.ndarray:
        """Model outputs (B, F, h, w, C) -> host float32 pixels (B, F, H, W, 3)."""
        if self.vae_checkpoint:
            self._vae_model()
            videos = self._decode(self._vae_params, videos)
        if jax.process_count() > 1:  # a global array spans other hosts' devices: gather it
            from jax.experimental import multihost_utils

            videos = multihost_utils.process_allgather(videos, tiled=True)
        return media.to_rgb(np.asarray(jax.device_get(videos), np.float32))

    # --- one schedule ---------------------------------------------------------------------------
    def _run_schedule(self, x_T, taus, tau_next, cond, rng, labels, params):
        taus, tau_next = np.asarray(taus, np.float32), np.asarray(tau_next, np.float32)
        if cond is not None:
            cond = cond.replace(
                mask=self._batch_sharded(cond.mask), values=self._batch_sharded(cond.values)
            )
        return self._sample_fn(
            self._batch_sharded(x_T),
            self._batch_sharded(taus, 1),
            self._batch_sharded(tau_next, 1),
            rng,
            cond,
            (params, self._batch_sharded(labels)),
        )

    def _task_kwargs(self):
        s = self.sample_config
        return dict(
            noise_multiplier=float(s.noise_multiplier), policy=s.policy,
            num_timesteps=self.schedule.num_timesteps,
        )

    def _keyframes(self, clips, task):
        n = self.num_frames
        indices = parse_ints(self.sample_config.frame_indices, "frame_indices")
        if indices is None:
            if task == "any_frame":
                raise ValueError("task any_frame needs sample.frame_indices, e.g. '0,4'")
            indices = [0, n - 1]
        k = clips.shape[1]
        if k == n:
            return clips[:, np.asarray(indices)], indices
        if k == len(indices):
            return clips, indices
        raise ValueError(
            f"{task} got {k} input frames for keyframes {indices}: give a {n}-frame video or "
            f"exactly {len(indices)} frames (images)"
        )

    def _window(self, task, clips, batch, noise, k_steps, labels, params):
        """One N-frame window of `task` (inputs in model space). Returns model-space output."""
        n, steps, kw = self.num_frames, self.steps, self._task_kwargs()
        num_t = self.schedule.num_timesteps
        if task == "generate":
            taus, nxt, cond = tasks.generate(steps, batch, n, num_timesteps=num_t)
        elif task == "pyramid":
            taus, nxt, cond = tasks.pyramid(
                steps, batch, n, delay=int(self.sample_config.delay), num_timesteps=num_t
            )
        elif task == "i2v":
            taus, nxt, cond = tasks.i2v(steps, clips[:, 0], n, **kw)
        elif task in ("interpolate", "any_frame"):
            frames, indices = self._keyframes(clips, task)
            taus, nxt, cond = tasks.any_frame(steps, frames, indices, n, **kw)
        elif task == "transition":
            overlap = clips.shape[1] // 2
            if clips.shape[1] != 2 * overlap or overlap == 0:
                raise ValueError(
                    f"transition inputs have {clips.shape[1]} frames; need 2 * overlap (the end "
                    f"of clip A, then the start of clip B)"
                )
            taus, nxt, cond = tasks.transition(
                steps, clips[:, :overlap], clips[:, overlap:], n, overlap, **kw
            )
        elif task == "next_frame":
            if clips.shape[1] < n - 1:
                raise ValueError(f"next_frame needs {n - 1} context frames, got {clips.shape[1]}")
            taus, nxt, cond = tasks.next_frame(steps, clips[:, : n - 1], **kw)
        elif task == "progressive":
            image = None if clips is None else clips[:, 0]
            taus, nxt, cond = tasks.progressive(
                steps, n, batch=batch, image=image, slope=float(self.sample_config.slope),
                policy=self.sample_config.policy, num_timesteps=num_t,
            )
            guess = None if image is None else image[:, None]
            noise = tasks.start_from(self.schedule, noise, taus, guess)
        else:
            raise ValueError(f"task {task!r} is not a single-window task")
        return self._run_schedule(noise, taus, nxt, cond, k_steps, labels, params)

    def _extend(self, clips, batch, k_noise, k_steps, labels, params):
        n, total = self.num_frames, int(self.sample_config.total_frames)
        overlap = int(self.sample_config.overlap or n // 2)
        shape = (batch, n, self.input_size, self.input_size, self.channels)
        if clips is None:
            clips = self._window("generate", None, batch, jax.random.normal(k_noise, shape),
                                 k_steps, labels, params)
        elif clips.shape[1] < overlap:
            raise ValueError(f"extend inputs have {clips.shape[1]} frames, fewer than overlap={overlap}")
        pieces, previous, count, chunk = [clips], clips, clips.shape[1], 1
        while count < total:
            taus, nxt, cond = tasks.extend(self.steps, previous, n, overlap, **self._task_kwargs())
            noise = jax.random.normal(jax.random.fold_in(k_noise, chunk), shape)
            out = self._run_schedule(
                noise, taus, nxt, cond, jax.random.fold_in(k_steps, chunk), labels, params
            )
            pieces.append(out[:, overlap:])
            previous, count, chunk = out, count + n - overlap, chunk + 1
        return jnp.concatenate(pieces, axis=1)[:, :total]

    def _rolling(self, batch, k_noise, k_steps, labels, params):
        n, total, num_t = self.num_frames, int(self.sample_config.total_frames), self.schedule.num_timesteps
        shape = (batch, n, self.input_size, self.input_size, self.channels)
        warm = tasks.diagonal_warmup(self.steps, batch, n, num_timesteps=num_t)
        rounds = tasks.diagonal(self.steps, batch, n, num_timesteps=num_t)
        window = self._run_schedule(
            jax.random.normal(k_noise, shape), warm[0], warm[1], None, k_steps, labels, params
        )

        def round_fn(window, r):
            return self._run_schedule(
                window, rounds[0], rounds[1], None, jax.random.fold_in(k_steps, r + 1), labels,
                params,
            )

        def new_frame(r):
            return jax.random.normal(jax.random.fold_in(k_noise, r + 1), (batch,) + shape[2:])

        return tasks.rolling_generate(round_fn, window, total, new_frame)

    def run(self, task: str, rng, *, inputs=None, model_inputs=None, labels=None,
            batch_size: int | None = None, params=None) -> np.ndarray:
        """Samples `task` for one batch: host float32 pixels (B, F_out, H, W, 3) in about [-1, 1].

        rng: a key; the noise, the sampler's steps and random labels derive from it.
        inputs: pixels (B, K, H, W, 3) in [-1, 1] (encoded by the VAE for latent models), or
        model_inputs: clips already in model space (B, K, h, w, C). labels (B,) int (class-
        conditional models; None draws them). batch_size: B when there are no inputs.
        params: overrides the sampler's parameters for this call.
        """
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {list(TASKS)}")
        params = self.params if params is None else self.place_params(params)
        if params is None:
            raise ValueError("VideoSampler has no parameters: pass params=...")
        if inputs is not None and model_inputs is not None:
            raise ValueError("give inputs (pixels) or model_inputs, not both")
        clips = model_inputs
        if inputs is not None:
            inputs = np.asarray(inputs, np.float32)
            want = self.pixel_shape[1:]
            if inputs.ndim != 5 or inputs.shape[2:] != want:
                raise ValueError(
                    f"inputs of shape {inputs.shape}; expected (B, K) + {want} pixels in [-1, 1]"
                )
            clips = inputs
        if clips is not None:
            if task not in TAKES_INPUTS:
                raise ValueError(f"task {task} takes no inputs")
            batch = int(np.shape(clips)[0])
        elif task in NEEDS_INPUTS:
            raise ValueError(f"task {task} needs inputs (B, K, H, W, 3)")
        elif batch_size is None:
            raise ValueError(f"task {task} without inputs needs batch_size")
        else:
            batch = int(batch_size)
        # Pad the batch to a multiple of the mesh's batch split; the padding is cut off below.
        padded = math.ceil(batch / self.divisor) * self.divisor

        def pad(a):
            a = np.asarray(a) if not isinstance(a, jax.Array) else a
            if padded == batch:
                return a
            return jnp.concatenate([a, jnp.repeat(a[-1:], padded - batch, axis=0)], axis=0)

        if clips is not None:
            clips = pad(clips)
            if inputs is not None:
                clips = self.to_model_space(clips)
            clips = jnp.asarray(clips, jnp.float32)
        k_noise, k_steps, k_labels = jax.random.split(rng, 3)
        if labels is None:
            labels = (
                jax.random.randint(k_labels, (batch,), 0, self.num_classes)
                if self.num_classes else jnp.zeros((batch,), jnp.int32)
            )
        labels = pad(jnp.asarray(labels, jnp.int32).reshape(batch))
        shape = (padded, self.num_frames, self.input_size, self.input_size, self.channels)
        if task == "extend":
            out = self._extend(clips, padded, k_noise, k_steps, labels, params)
        elif task == "rolling":
            out = self._rolling(padded, k_noise, k_steps, labels, params)
        else:
            noise = jax.random.normal(k_noise, shape)
            out = self._window(task, clips, padded, noise, k_steps, labels, params)
        return self.to_pixels(out[:batch])


# ------------------------------------------------------------------------------------------------
# Parameters: the EMA weights of WORKDIR's latest training checkpoint, or an inference checkpoint.


def load_sampling_params(config, workdir: str):
    """(model_config, diffusion_config, params {'params': ...}) for sampling.

    sample.checkpoint (an exported / converted inference checkpoint) wins; otherwise the EMA
    parameters of the latest checkpoint under WORKDIR/checkpoints with config.model.
    """
    from fvdm_jax.checkpoint import TrainCheckpointer, load_inference_checkpoint

    path = config.sample.get("checkpoint")
    if path:
        params, saved = load_inference_checkpoint(path)
        logging.info("sampling with the inference checkpoint %s", path)
        return saved["model"], saved["diffusion"], _unwrap(params)
    from fvdm_jax.recipe import weights_config

    ckpt = TrainCheckpointer(workdir, config.checkpoint, read_only=True)
    try:
        latest = ckpt.latest_step()
        if latest is None:
            raise FileNotFoundError(
                f"no checkpoint under {ckpt.directory}: train first, or set "
                f"--config.sample.checkpoint=DIR (an exported or converted inference checkpoint)"
            )
        model_config, diffusion_config = weights_config(ckpt.saved_config(latest), config)
        mesh = shd.make_mesh(config.mesh)
        ema = ckpt.restore_ema(latest, abstract_params(model_config, mesh, shd.rules_from_config(config.mesh)))
    finally:
        ckpt.close()
    logging.info("sampling with the EMA parameters of step %d (%s)", latest, ckpt.directory)
    return model_config, diffusion_config, ema


def abstract_params(model_config, mesh, rules):
    """{'params': ...} of ShapeDtypeStructs with their logical shardings on `mesh`."""
    model = model_from_config(model_config)
    boxed = _boxed_params(model, model_config)
    shardings = shd.logical_shardings(boxed, mesh, rules)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed), shardings)


def _boxed_params(model, model_config):
    f, h, c = (int(model_config[k]) for k in ("num_frames", "input_size", "in_channels"))
    labels = jnp.zeros((1,), jnp.int32) if int(model_config.get("num_classes") or 0) else None
    return jax.eval_shape(
        lambda r: model.init(r, jnp.zeros((1, f, h, h, c)), jnp.zeros((1, f)), labels),
        jax.random.key(0),
    )


# ------------------------------------------------------------------------------------------------
# The inputs of a job: files (sample.inputs) or clips of the config's data source.


class JobInputs:
    """The inputs and labels of video i of a job (a pure function of i)."""

    def __init__(self, config, sampler: VideoSampler, workdir: str):
        s = config.sample
        self.task = s.task
        self.num_classes = sampler.num_classes
        self.labels = parse_ints(s.labels, "labels")
        self.clips = None  # pixel clips from files (each (K, H, W, 3))
        self.source = None  # model-space clips from the data source
        spec = s.get("inputs")
        wants = self.task in NEEDS_INPUTS or (self.task in TAKES_INPUTS and spec)
        if not wants:
            return
        if spec and spec != DATA_INPUTS:
            size = sampler.pixel_shape[1]
            paths = [p for p in str(spec).split(",") if p]
            clips = media.load_inputs(paths, size)
            self.clips = self._arrange(clips, sampler, s)
        else:
            from fvdm_jax.data.pipeline import make_source

            self.source = make_source(config.data, sampler.model_config, config.get("vae"),
                                      workdir=workdir)
            self.overlap = self._transition_overlap(sampler, s, None)

    def _transition_overlap(self, sampler, s, clips):
        n = sampler.num_frames
        overlap = int(s.overlap) if s.overlap else max(1, n // 4)
        if clips is not None:
            overlap = min([overlap] + [c.shape[0] for c in clips])
        if 2 * overlap >= n:
            raise ValueError(f"transition overlap={overlap} must be < num_frames / 2 = {n / 2}")
        return overlap

    def _arrange(self, clips, sampler, s):
        if self.task in ("i2v", "progressive"):
            return [c[:1] for c in clips]
        if self.task == "transition":
            if len(clips) != 2:
                raise ValueError(
                    f"transition needs 2 inputs (clip A, clip B), got {len(clips)}: "
                    f"--config.sample.inputs=a.mp4,b.mp4"
                )
            overlap = self._transition_overlap(sampler, s, clips)
            return [np.concatenate([clips[0][-overlap:], clips[1][:overlap]])]
        if len(clips) > 1 and all(c.shape[0] == 1 for c in clips):
            return [np.concatenate(clips)]  # several images: the frames of one clip
        lengths = {c.shape[0] for c in clips}
        if len(lengths) > 1:
            shortest = min(lengths)
            logging.warning("sample inputs have %s frames; all are cut to %d", sorted(lengths), shortest)
            clips = [c[:shortest] for c in clips]
        return clips

    def batch(self, indices) -> tuple[dict, np.ndarray | None]:
        """({'inputs': ...} or {'model_inputs': ...} or {}, labels (B,) or None)."""
        labels = None
        if self.labels:
            labels = np.asarray([self.labels[i % len(self.labels)] for i in indices], np.int32)
        if self.clips is not None:
            return {"inputs": np.stack([self.clips[i % len(self.clips)] for i in indices])}, labels
        if self.source is None:
            return {}, labels
        if self.task == "transition":
            items = [(self.source[2 * i], self.source[2 * i + 1]) for i in indices]
            o = self.overlap
            clips = [np.concatenate([a["video"][-o:], b["video"][:o]]) for a, b in items]
            item_labels = [a["label"] for a, _ in items]
        else:
            items = [self.source[i] for i in indices]
            clips = [item["video"] for item in items]
            item_labels = [item["label"] for item in items]
        if labels is None and self.num_classes:
            labels = np.asarray(item_labels, np.int32)
        return {"model_inputs": np.stack(clips)}, labels


# ------------------------------------------------------------------------------------------------
# --mode=sample


def output_dir(config, workdir: str) -> str:
    s = config.sample
    return s.output_dir or os.path.join(
        workdir, "samples", f"{s.task}_{s.sampler}{s.num_steps}_seed{s.seed}"
    )


def weights_identity(config, workdir: str) -> str:
    """Which weights a job samples with: the inference checkpoint's path, or the training step of
    WORKDIR's latest checkpoint (more training must not mix into an earlier job's batches)."""
    if config.sample.get("checkpoint"):
        return os.path.abspath(config.sample.checkpoint)
    from fvdm_jax.checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(workdir, config.checkpoint, read_only=True)
    try:
        return f"{ckpt.directory} step {ckpt.latest_step()}"
    finally:
        ckpt.close()


def _record(config, model_config, weights: str) -> dict:
    s = config.sample.to_dict() if hasattr(config.sample, "to_dict") else dict(config.sample)
    s.pop("every_steps", None), s.pop("train_tasks", None), s.pop("train_num_videos", None)
    s.pop("num_videos", None)  # more videos may be asked for on resume
    s.pop("output_dir", None)
    return json.loads(json.dumps({"sample": s, "model": dict(model_config), "weights": weights}))


def _write_batch(path: str, videos: np.ndarray, labels: np.ndarray) -> None:
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, videos=videos, labels=labels)
    os.replace(tmp, path)


def write_media(directory: str, videos: np.ndarray, first_index: int, fps: int, name: str,
                sheet_frame_size: int = 1):
    """MP4 + GIF per video (video_XXXXX) and one contact sheet `name`.png whose frames are
    enlarged (nearest neighbour) to at least `sheet_frame_size` pixels."""
    for i, video in enumerate(videos):
        stem = os.path.join(directory, f"video_{first_index + i:05d}")
        media.write_mp4(stem + ".mp4", video, fps)
        media.write_gif(stem + ".gif", video, fps)
    scale = media.sheet_scale(videos.shape[2], sheet_frame_size)
    media.write_png(os.path.join(directory, f"{name}.png"), media.frame_grid(videos, scale=scale))


def sample_job(config, workdir: str) -> str:
    """--mode=sample: writes OUT/samples.npz (returned), MP4/GIF/PNG media and OUT/sample.json."""
    from tqdm import tqdm

    s = config.sample
    validate_sample_config(s, config.model)
    model_config, diffusion_config, params = load_sampling_params(config, workdir)
    sampler = VideoSampler(config, params, model_config=model_config,
                           diffusion_config=diffusion_config)
    job_inputs = JobInputs(config, sampler, workdir)
    out = output_dir(config, workdir)
    batches_dir, media_dir = os.path.join(out, "batches"), os.path.join(out, "media")
    is_main = jax.process_index() == 0
    record = _record(config, model_config, weights_identity(config, workdir))
    record_path = os.path.join(out, "sample.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            previous = json.load(f)
        if previous.get("settings") != record:
            raise ValueError(
                f"{out} holds samples made with other settings or weights; choose another "
                f"--config.sample.output_dir or remove it"
            )
    num_videos, batch = int(s.num_videos), int(s.batch_size)
    num_batches = math.ceil(num_videos / batch)
    if is_main:
        os.makedirs(batches_dir, exist_ok=True)
        if s.save_media:
            os.makedirs(media_dir, exist_ok=True)
    seed_key = jax.random.key(int(s.seed))
    timings = []
    for k in tqdm(range(num_batches), desc=f"sampling {s.task}", disable=not is_main):
        path = os.path.join(batches_dir, f"batch_{k:05d}.npz")
        if os.path.exists(path):
            continue  # done before an interruption: every batch is a function of (seed, k)
        indices = list(range(k * batch, (k + 1) * batch))
        kwargs, labels = job_inputs.batch(indices)
        started = time.perf_counter()
        videos = sampler.run(s.task, jax.random.fold_in(seed_key, k), labels=labels,
                             batch_size=batch, **kwargs)
        timings.append(time.perf_counter() - started)
        keep = min(batch, num_videos - k * batch)
        videos = media.to_uint8(videos[:keep])
        if labels is None:
            labels = np.zeros((batch,), np.int32)
        if is_main:
            _write_batch(path, videos, np.asarray(labels[:keep], np.int32))
            if s.save_media:
                write_media(media_dir, videos, k * batch, int(s.fps), f"batch_{k:05d}",
                            int(s.get("sheet_frame_size", 1)))
    if not is_main:
        return os.path.join(out, "samples.npz")
    videos, labels = [], []
    for k in range(num_batches):
        with np.load(os.path.join(batches_dir, f"batch_{k:05d}.npz")) as data:
            videos.append(data["videos"])
            labels.append(data["labels"])
    videos = np.concatenate(videos)[:num_videos]
    labels = np.concatenate(labels)[:num_videos]
    final = os.path.join(out, "samples.npz")
    tmp = final + f".tmp{os.getpid()}.npz"
    np.savez(tmp, videos=videos, labels=labels, task=np.asarray(s.task))
    os.replace(tmp, final)
    steady = timings[1:]
    info = {
        "settings": record,
        "num_videos": int(videos.shape[0]),
        "shape": list(videos.shape),
        "batches_sampled_now": len(timings),
        "first_batch_sec": timings[0] if timings else None,  # includes compilation
        "sec_per_batch": float(np.mean(steady)) if steady else None,
        "sec_per_video": float(np.mean(steady)) / batch if steady else None,
        "compilations": sampler.compilations(),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    with open(record_path, "w") as f:
        json.dump(info, f, indent=2)
    logging.info("wrote %d videos %s to %s", videos.shape[0], videos.shape[1:], final)
    return final


# ------------------------------------------------------------------------------------------------
# Samples during training


class TrainingSamples:
    """Every sample.every_steps: sample.train_num_videos videos of each of sample.train_tasks with
    the EMA weights (same noise and inputs every time, so runs show progress), written to
    WORKDIR/samples/step_N/ and returned as contact-sheet images for TensorBoard."""

    def __init__(self, config, workdir: str, mesh, source):
        s = config.sample
        self.workdir = workdir
        self.tasks = tuple(s.train_tasks)
        self.fps = int(s.fps)
        self.sheet_frame_size = int(s.get("sheet_frame_size", 1))
        self.sampler = VideoSampler(config, None, mesh=mesh)
        count = int(s.train_num_videos)
        self.batch = count
        needs = any(t in NEEDS_INPUTS for t in self.tasks)
        self.clips = None
        self.labels = None
        if needs or self.sampler.num_classes:
            items = [source[i] for i in range(count)]
            self.clips = np.stack([item["video"] for item in items])
            if self.sampler.num_classes:
                self.labels = np.asarray([item["label"] for item in items], np.int32)
        self.key = jax.random.key(int(s.seed))

    def __call__(self, step: int, ema_params) -> dict[str, np.ndarray]:
        directory = os.path.join(self.workdir, "samples", f"step_{step}")
        images = {}
        for task in self.tasks:
            kwargs = {"model_inputs": self.clips} if task in NEEDS_INPUTS else {}
            videos = self.sampler.run(task, self.key, labels=self.labels, batch_size=self.batch,
                                      params=ema_params, **kwargs)
            videos = media.to_uint8(videos)
            scale = media.sheet_scale(videos.shape[2], self.sheet_frame_size)
            images[f"samples/{task}"] = media.frame_grid(videos, scale=scale)
            if jax.process_index() == 0:
                task_dir = os.path.join(directory, task)
                os.makedirs(task_dir, exist_ok=True)
                write_media(task_dir, videos, 0, self.fps, "contact_sheet", self.sheet_frame_size)
        return images
