"""The sampling engine: every zero-shot task of FVDM from one model, on the device mesh.

`VideoSampler` takes a task of the registry (fvdm_jax/diffusion/tasks.py), builds its per-frame
schedule, runs it as one jitted `lax.scan` (diffusion/samplers.py) with the batch sharded over the
mesh, and returns pixels (VAE-decoded for latent models). It is built from the model config, the
diffusion schedule, the mesh and the sampling options (`VideoSampler.from_config` reads them from
a full config); it knows nothing of files or jobs (fvdm_jax/jobs/sample.py is `--mode=sample`).
Classifier-free guidance (sample.cfg_scale) and history guidance (sample.history_guidance, on the
context frames of the conditioning tasks) are one batched model call (diffusion/guidance.py).

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

import logging
import math
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.data import media
from fvdm_jax.diffusion import staggered, tasks
from fvdm_jax.diffusion.gaussian import eps_output
from fvdm_jax.diffusion.guidance import HistoryGuidance, guided_model_fn
from fvdm_jax.diffusion.samplers import make_sampler
from fvdm_jax.diffusion.schedule import Schedule
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.dit import model_from_config
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.sampling.weights import unwrap_params
from fvdm_jax.training.state import abstract_state


def parse_ints(text, name: str) -> list[int] | None:
    """'0,7,15' -> [0, 7, 15]; None / '' -> None."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return [int(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ConfigError(f"sample.{name}={text!r} must be comma-separated integers") from None


def validate_sample_config(sample: Mapping[str, Any], model: Mapping[str, Any]) -> None:
    """One-line errors for sample settings that do not fit together or do not fit the model
    (the weights' model section, which may be a checkpoint's). Single keys (choices, ranges) are
    the schema's (fvdm_jax/config/schema.py)."""
    _validate_guidance_and_policy(sample)
    num_frames = int(model["num_frames"])
    overlap = sample.get("overlap")
    if overlap is not None and not 0 < int(overlap) < num_frames:
        raise ConfigError(f"sample.overlap={overlap} must lie in [1, model.num_frames - 1]")
    for index in parse_ints(sample.get("frame_indices"), "frame_indices") or []:
        if not 0 <= index < num_frames:
            raise ConfigError(
                f"sample.frame_indices has {index}, outside [0, model.num_frames - 1 = "
                f"{num_frames - 1}]"
            )
    labels = parse_ints(sample.get("labels"), "labels")
    num_classes = int(model.get("num_classes") or 0)
    if labels and (num_classes == 0 or min(labels) < 0 or max(labels) >= num_classes):
        raise ConfigError(
            f"sample.labels={sample['labels']!r} needs a class-conditional model with labels in "
            f"[0, {num_classes - 1}] (model.num_classes={num_classes})"
        )


def _validate_guidance_and_policy(sample: Mapping[str, Any]) -> None:
    scale = float(sample["history_guidance"])
    mode = sample["history_guidance_mode"]
    if scale and mode == "fractional" and sample["history_noise_level"] is None:
        raise ConfigError("sample.history_guidance_mode='fractional' needs "
                          "sample.history_noise_level (an integer tau, e.g. 500)")
    if sample["policy"] != "released":
        return
    if scale:
        raise ConfigError("sample.history_guidance needs context frames the sampler keeps clean: "
                          "set sample.policy=hold or replace ('released' labels them like the "
                          "other frames), or sample.history_guidance=0")
    if float(sample["noise_multiplier"]):
        raise ConfigError(f"sample.noise_multiplier={sample['noise_multiplier']} has no meaning "
                          f"under sample.policy='released' (given frames are labelled t like the "
                          f"others): set it to 0, or use policy hold / replace")
    if sample["task"] == "progressive":
        raise ConfigError("task progressive ramps frame 0 (slope * t) and cannot use "
                          "sample.policy='released': use hold or replace")


# The keys of config.sample the sampler reads (their defaults are configs/default.py's).
OPTION_KEYS = (
    "sampler", "num_steps", "eta", "clip_denoised", "cfg_scale", "policy", "noise_multiplier",
    "frame_indices", "overlap", "total_frames", "slope", "delay", "history_guidance",
    "history_guidance_mode", "history_noise_level",
)


class VideoSampler:
    """Samples any task with one model on a mesh; compiles once per (task shape, batch size).

    model_config: the model section (a mapping); schedule: the diffusion `Schedule`; options: the
    sampling options (config.sample; the keys of OPTION_KEYS); mesh and rules: where the
    batch and the parameters live; vae: the vae section when the model samples VAE latents
    (decoded to pixels here), else None. params: {'params': ...} or the bare tree (EMA weights);
    may also be given per `run`. ptss_p: the PTSS probability the weights were trained with
    (None: unknown); history guidance on weights trained with p = 0 logs a warning.
    """

    def __init__(self, model_config: Mapping[str, Any], schedule: Schedule,
                 options: Mapping[str, Any], *, mesh, rules, vae: Mapping[str, Any] | None = None,
                 params=None, ptss_p: float | None = None):
        self.model_config = dict(model_config)
        missing = [k for k in OPTION_KEYS if k not in options]
        if missing:
            raise ConfigError(f"sample options lack {missing}: pass a config's sample section "
                              f"(configs/default.py holds every key)")
        self.options = {k: options[k] for k in OPTION_KEYS}
        self.model = model_from_config(self.model_config)
        self.schedule = schedule
        self.mesh, self.rules = mesh, rules
        self.divisor = shd.batch_divisor(self.mesh, self.rules)
        m = self.model_config
        self.num_frames = int(m["num_frames"])
        self.input_size = int(m["input_size"])
        self.channels = int(m["in_channels"])
        self.num_classes = int(m.get("num_classes") or 0)
        self.vae_config = dict(vae) if vae and vae.get("checkpoint") else None
        self.vae_checkpoint = self.vae_config["checkpoint"] if self.vae_config else None
        self._vae = None
        o = self.options
        self.steps = int(o["num_steps"])
        self.cfg_scale = float(o["cfg_scale"])
        self.history_guidance = self._history_guidance(ptss_p)
        self._no_context_logged = set()
        self._sample_fn = make_sampler(
            self._model_fn, self.schedule, sampler=o["sampler"], eta=float(o["eta"]),
            clip_denoised=bool(o["clip_denoised"]), history_guidance=self.history_guidance,
        )
        self.param_shardings = abstract_state(self.model, self.mesh, self.rules)[1].params
        self.params = None if params is None else self.place_params(params)

    @classmethod
    def from_config(cls, config, params=None, *, mesh=None, devices=None, model_config=None,
                    diffusion_config=None):
        """From a full config (model, diffusion, sample, vae, mesh, data); model / diffusion may be
        overridden, e.g. by the sections an inference checkpoint was saved with. The mesh is
        config.mesh over `devices` (default jax.devices(); e.g. a TPU slice's compile-only
        devices, then `lower` gives the program to compile) unless `mesh` is given."""
        model_config = dict(model_config or config.model)
        validate_sample_config(config.sample, model_config)
        vae = config.get("vae") or {}
        if config.data.get("source") == "latents" and not vae.get("checkpoint"):
            raise ConfigError(
                "the model samples VAE latents (data.source='latents'); set vae.checkpoint to "
                "the diffusers AutoencoderKL folder that decodes them"
            )
        mesh = mesh if mesh is not None else shd.make_mesh(config.mesh, devices)
        ptss = config.get("ptss") or {}
        # How often training showed frames at different levels together: p for the PTSS
        # schemes, always for independent / FoPP timesteps.
        mixed = ptss.get("p") if ptss.get("scheme", "ptss") in ("ptss", "ptss_fopp") else 1.0
        return cls(model_config, Schedule.from_config(diffusion_config or config.diffusion),
                   config.sample, mesh=mesh, rules=shd.rules_from_config(config.mesh), vae=vae,
                   params=params, ptss_p=mixed)

    def _history_guidance(self, ptss_p) -> HistoryGuidance | None:
        o = self.options
        if not float(o["history_guidance"]):
            return None
        try:
            guidance = HistoryGuidance(float(o["history_guidance"]), o["history_guidance_mode"],
                                       o["history_noise_level"])
            guidance.level(self.schedule.num_timesteps)
        except ValueError as e:
            raise ConfigError(f"sample.history_*: {e}") from None
        if ptss_p is not None and float(ptss_p) == 0.0:
            logging.warning(
                "history guidance (sample.history_guidance=%s) on weights trained with ptss.p=0: "
                "such a model has never seen frames at different noise levels together, so its "
                "history-free branch is out of distribution; expect little or harmful guidance",
                o["history_guidance"])
        return guidance

    # --- shapes, placement --------------------------------------------------------------------
    @property
    def pixel_shape(self) -> tuple[int, int, int, int]:
        """(F, H, W, 3) of one output window in pixels."""
        size = self.input_size * (self._vae_model().downsample_factor if self.vae_checkpoint else 1)
        return self.num_frames, size, size, 3

    def place_params(self, params):
        """Puts parameters onto their logical shardings (a no-op for training's EMA params)."""
        return jax.device_put(unwrap_params(params), self.param_shardings)

    def compilations(self) -> int:
        """How many programs the scan sampler has compiled (one per distinct shape)."""
        return self._sample_fn._cache_size()

    def _batch_sharded(self, array, axis: int = 0):
        spec = [None] * np.ndim(array)
        spec[axis] = shd.batch_sharding(self.mesh, self.rules, 1).spec[0]
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))
        return jax.device_put(jnp.asarray(array), sharding)

    # --- the model ----------------------------------------------------------------------------
    def _model_fn(self, args, x, tau, history=None):
        """The guided eps prediction (class and history guidance in one batched call)."""
        params, labels = args

        def apply(x, tau, labels):  # each branch converted to eps at its own input
            out = self.model.apply(params, x, tau, labels if self.num_classes else None)
            return eps_output(self.schedule, out, x, tau)

        model_fn = guided_model_fn(
            apply, self.channels, labels=labels if self.num_classes else None,
            null_label=self.num_classes, cfg_scale=self.cfg_scale)
        return model_fn(x, tau, history=history)

    def _vae_model(self):
        if self._vae is None:
            from fvdm_jax.convert.diffusers_vae import load_diffusers_vae
            from fvdm_jax.models.dit import DTYPES
            from fvdm_jax.models.vae import decode_video, encode_video

            vae_cfg = self.vae_config
            vae, params = load_diffusers_vae(
                vae_cfg["checkpoint"], dtype=DTYPES[vae_cfg.get("dtype", "float32")]
            )
            if vae_cfg.get("scale_factor"):
                vae = vae.clone(scaling_factor=float(vae_cfg["scale_factor"]))
            self._vae = vae
            self._vae_params = jax.device_put(params, jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec()))
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

    # --- schedules ------------------------------------------------------------------------------
    def _run_schedule(self, x_T, taus, tau_next, cond, rng, labels, params):
        taus, tau_next = np.asarray(taus, np.float32), np.asarray(tau_next, np.float32)
        if cond is not None:
            cond = cond.replace(
                mask=self._batch_sharded(cond.mask), values=self._batch_sharded(cond.values)
            )
        # Always under the context: the trace cache keys on the mesh, not on flax's rules.
        with shd.activation_context(self.mesh, self.rules):
            return self._sample_fn(
                self._batch_sharded(x_T),
                self._batch_sharded(taus, 1),
                self._batch_sharded(tau_next, 1),
                rng,
                cond,
                (params, self._batch_sharded(labels)),
            )

    def padded(self, batch: int) -> int:
        """The batch a run of `batch` videos computes: a multiple of the mesh's batch split."""
        return math.ceil(int(batch) / self.divisor) * self.divisor

    def lower(self, task: str = "generate", batch: int = 1):
        """The scan program of one window of `task` (no input clips) for `batch` videos, lowered
        on abstract parameters, noise and labels with their shardings: nothing is allocated
        (--mode=compile compiles it for a TPU slice)."""
        spec = tasks.get_task(task)
        if spec.build is None or spec.needs_inputs:
            raise ConfigError(f"task {task!r} needs input clips or several windows; lower "
                              f"'generate' or another single-window task without inputs")
        padded = self.padded(batch)
        taus, nxt, cond, _ = spec.build(self._window_request(padded, None))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        def abstract(shape, dtype, axis=0):
            spec_ = [None] * len(shape)
            spec_[axis] = shd.batch_sharding(self.mesh, self.rules, 1).spec[0]
            sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec_))
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        params = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state(self.model, self.mesh, self.rules)[0].params, self.param_shardings)
        key = jax.eval_shape(lambda: jax.random.key(0))
        shape = (padded, self.num_frames, self.input_size, self.input_size, self.channels)
        with shd.activation_context(self.mesh, self.rules):
            return self._sample_fn.lower(
                abstract(shape, jnp.float32),
                abstract(np.shape(taus), jnp.float32, 1),
                abstract(np.shape(nxt), jnp.float32, 1),
                jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
                cond,
                (params, abstract((padded,), jnp.int32)),
            )

    def _log_unguided(self, spec: tasks.Task, has_inputs: bool):
        """History guidance needs context frames: say once per task when there are none."""
        has_context = has_inputs or (spec.long and spec.takes_inputs)  # extend: chunks >= 1
        if self.history_guidance is None or has_context or spec.name in self._no_context_logged:
            return
        self._no_context_logged.add(spec.name)
        logging.info("history guidance has no effect on task %s here: it has no context frames",
                     spec.name)

    def _window_request(self, batch: int, clips) -> tasks.Window:
        o = self.options
        return tasks.Window(
            steps=self.steps, batch=batch, num_frames=self.num_frames,
            num_timesteps=self.schedule.num_timesteps, clips=clips,
            frame_indices=parse_ints(o["frame_indices"], "frame_indices"),
            noise_multiplier=float(o["noise_multiplier"]), policy=o["policy"],
            slope=float(o["slope"]), delay=int(o["delay"]),
        )

    def _window(self, task: tasks.Task, clips, batch, noise, k_steps, labels, params):
        """One N-frame window of `task` (inputs in model space). Returns model-space output."""
        if task.build is None:
            raise ConfigError(f"task {task.name!r} is not a single-window task")
        taus, nxt, cond, guess = task.build(self._window_request(batch, clips))
        if task.noised_start:
            noise = tasks.start_from(self.schedule, noise, taus, guess)
        return self._run_schedule(noise, taus, nxt, cond, k_steps, labels, params)

    def _extend(self, clips, batch, k_noise, k_steps, labels, params):
        n, total = self.num_frames, int(self.options["total_frames"])
        overlap = tasks.get_task("extend").overlap(n, self.options["overlap"])
        shape = (batch, n, self.input_size, self.input_size, self.channels)
        if clips is None:
            clips = self._window(tasks.get_task("generate"), None, batch,
                                 jax.random.normal(k_noise, shape), k_steps, labels, params)
        request = self._window_request(batch, None)

        def chunk(context, k):
            taus, nxt, cond = tasks.extend(self.steps, context, n, overlap, **request.conditioning)
            noise = jax.random.normal(jax.random.fold_in(k_noise, k), shape)
            return self._run_schedule(noise, taus, nxt, cond, jax.random.fold_in(k_steps, k),
                                      labels, params)

        return tasks.generate_long(chunk, clips, total, overlap=overlap, chunk=n)

    def _rolling(self, batch, k_noise, k_steps, labels, params):
        n, total, num_t = self.num_frames, int(self.options["total_frames"]), self.schedule.num_timesteps
        shape = (batch, n, self.input_size, self.input_size, self.channels)
        warm = staggered.diagonal_warmup(self.steps, batch, n, num_timesteps=num_t)
        rounds = staggered.diagonal(self.steps, batch, n, num_timesteps=num_t)
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

        return staggered.rolling_generate(round_fn, window, total, new_frame)

    def run(self, task: str, rng, *, inputs=None, model_inputs=None, labels=None,
            batch_size: int | None = None, params=None) -> np.ndarray:
        """Samples `task` for one batch: host float32 pixels (B, F_out, H, W, 3) in about [-1, 1].

        rng: a key; the noise, the sampler's steps and random labels derive from it.
        inputs: pixels (B, K, H, W, 3) in [-1, 1] (encoded by the VAE for latent models), or
        model_inputs: clips already in model space (B, K, h, w, C). labels (B,) int (class-
        conditional models; None draws them). batch_size: B when there are no inputs.
        params: overrides the sampler's parameters for this call.
        """
        spec = tasks.get_task(task)
        self._log_unguided(spec, inputs is not None or model_inputs is not None)
        params = self.params if params is None else self.place_params(params)
        if params is None:
            raise ConfigError("VideoSampler has no parameters: pass params=...")
        if inputs is not None and model_inputs is not None:
            raise ConfigError("give inputs (pixels) or model_inputs, not both")
        clips = model_inputs
        if model_inputs is not None:  # host-side shape check: the scan sees only fixed shapes
            chex.assert_shape(model_inputs, (None, None, self.input_size, self.input_size,
                                             self.channels),
                              custom_message="model_inputs: clips in model space (B, K, h, w, C)")
        if inputs is not None:
            inputs = np.asarray(inputs, np.float32)
            want = self.pixel_shape[1:]
            if inputs.ndim != 5 or inputs.shape[2:] != want:
                raise ConfigError(
                    f"inputs of shape {inputs.shape}; expected (B, K) + {want} pixels in [-1, 1]"
                )
            clips = inputs
        if clips is not None:
            if not spec.takes_inputs:
                raise ConfigError(f"task {task} takes no inputs")
            batch = int(np.shape(clips)[0])
        elif spec.needs_inputs:
            raise ConfigError(f"task {task} needs inputs (B, K, H, W, 3)")
        elif batch_size is None:
            raise ConfigError(f"task {task} without inputs needs batch_size")
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
        labels = labels if isinstance(labels, jax.Array) else np.asarray(labels)
        chex.assert_shape(labels, (batch,), custom_message="labels: one class id per video")
        chex.assert_type(labels, int, custom_message="labels: integer class ids")
        labels = pad(jnp.asarray(labels, jnp.int32))
        shape = (padded, self.num_frames, self.input_size, self.input_size, self.channels)
        if task == "extend":
            out = self._extend(clips, padded, k_noise, k_steps, labels, params)
        elif task == "rolling":
            out = self._rolling(padded, k_noise, k_steps, labels, params)
        else:
            noise = jax.random.normal(k_noise, shape)
            out = self._window(spec, clips, padded, noise, k_steps, labels, params)
        return self.to_pixels(out[:batch])
