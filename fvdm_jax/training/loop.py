"""The training loop: sharded state, resumable orbax checkpoints, metrics, preemption.

The loop syncs with the devices only at log and checkpoint steps: the train step runs ahead
asynchronously, and the first non-finite step is recorded on device and checked at those syncs,
before anything is written. What else runs every few steps (samples, FVD) is passed in as
`PeriodicAction`s by the job layer (fvdm_jax/jobs/train.py): the loop imports no job.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.checkpoint.manager import TrainCheckpointer
from fvdm_jax.checkpoint.recipe import check_resume
from fvdm_jax.models.build import flat_model_config
from fvdm_jax.models.wan import Wan
from fvdm_jax.runtime import console
from fvdm_jax.training import fit, flops
from fvdm_jax.training.preemption import PeerWatch, Preemption, StopAgreement
from fvdm_jax.training.prefetch import DevicePrefetcher
from fvdm_jax.training.setup import Setup, build_setup
from fvdm_jax.training.state import TrainState, init_state
from fvdm_jax.training.step import (
    JittedTrainStep,
)


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss, gradient or update."""


@dataclasses.dataclass(frozen=True)
class PeriodicAction:
    """Runs every `every` steps (0 = never) after the step: fn(step, ema_params) -> a dict of
    scalars (kind 'scalars') or of uint8 images (kind 'images') for the metric writers."""

    name: str
    every: int
    fn: Callable[[int, Any], dict]
    kind: str = "scalars"

    def due(self, step: int) -> bool:
        return itstime(step, self.every)


# The job layer's actions, built once the loop knows the mesh and the data source.
ActionFactory = Callable[[jax.sharding.Mesh, Any], Sequence[PeriodicAction]]


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int  # the last completed step
    preempted: bool  # stopped early by SIGTERM / SIGINT on any process (checkpoint saved)
    compilations: int  # how many times the train step was traced (1 for a healthy run)
    first_step_sec: float | None  # wall time of the run's first step: mostly compilation
    exit_code: int = 0  # for the process: 0 finished, EXIT_SIGTERM / EXIT_SIGINT preempted (same on all)


def create_state(setup: Setup, seed: int) -> TrainState:
    """Initializes the state directly sharded (never materialized on one device first)."""
    init = jax.jit(
        lambda r: init_state(r, setup.model, setup.optimizer, boxed=False),
        out_shardings=setup.state_shardings,
    )
    return init(jax.random.key(seed))


def _mean_metrics(pending) -> dict:
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.mean(jnp.stack(xs)), *pending)
    return {k: float(v) for k, v in jax.device_get(stacked).items()}


def itstime(done: int, every: int, total: int | None = None, *, last: bool = True) -> bool:
    """Whether something that runs every `every` steps runs after step `done` (1-based): on its
    multiples (every <= 0: never), and with `last`, also after the final step `total`."""
    every = int(every or 0)
    if every > 0 and done % every == 0:
        return True
    return bool(last and total is not None and done == total)


def _check_finite(state: TrainState, last_saved: int | None):
    bad = int(jax.device_get(state.first_nonfinite_step))
    if bad >= 0:  # the 0-based index of the step; metrics and checkpoints count from 1
        raise NonFiniteError(
            f"non-finite loss, gradient or update at step {bad + 1}; the last checkpoint is step "
            f"{last_saved} and nothing later was saved; lower train.lr or set train.grad_clip"
        )


def train(
    config,
    workdir: str,
    *,
    devices=None,
    actions: ActionFactory | Sequence[PeriodicAction] = (),
    step_hook: Callable[[int], None] | None = None,
) -> TrainResult:
    """Trains config.train.num_steps steps, resuming from WORKDIR/checkpoints.

    actions: periodic actions on the EMA parameters, or a factory (mesh, data source) -> actions.
    `step_hook(step)` is called on the host after each dispatched step (tests use it).

    Signals are caught from here on (restore and compilation take minutes at scale); on several
    processes they all stop after the same step (training/preemption.py: StopAgreement), and one
    whose peer died ends with one line (PeerWatch, exit 75).
    """
    with Preemption() as preemption, PeerWatch(workdir):
        return _train(config, workdir, preemption, devices=devices, actions=actions, step_hook=step_hook)


def _train(config, workdir: str, preemption: Preemption, *, devices, actions, step_hook) -> TrainResult:
    from fvdm_jax.data.pipeline import host_batches, make_source
    from fvdm_jax.runtime.metrics import MetricsLogger, write_plots

    # config.mesh.fit: the layout (mesh, remat, micro-batches) whose step fits the devices.
    config, layout = fit.resolve(config, devices)
    setup = build_setup(config, devices)
    train_cfg = config.train
    num_steps, batch_size = int(train_cfg.num_steps), int(train_cfg.batch_size)
    # A Wan section in the flat form the data sources read (model.wan's keys at the top).
    source = make_source(config.data, flat_model_config(config.model), config.get("vae"), workdir=workdir)
    ckpt = TrainCheckpointer(workdir, config.checkpoint)

    # The newest checkpoint that reads back and verifies; damaged ones are moved aside.
    # LoRA: checkpoints hold the adapters; the frozen weights are put back at every start.
    lora_run = setup.abstract_state.frozen is not None
    resumed = ckpt.restore_newest_good(
        setup.abstract_state.replace(frozen=None) if lora_run else setup.abstract_state,
        check_config=lambda saved, step: check_resume(saved, config, step, ckpt.directory))
    latest = None if resumed is None else resumed[0]
    init_from = train_cfg.get("init_from")
    wan = isinstance(setup.model, Wan)
    if resumed is None and wan and (init_from or lora_run):
        from fvdm_jax.training.wan_init import first_state

        state = first_state(setup, config)
        start = 0
    elif resumed is None and init_from:
        # Fine-tuning: pretrained weights, a fresh optimizer, EMA = the weights (training/init_from.py).
        from fvdm_jax.training.init_from import state_from_pretrained

        state, _ = state_from_pretrained(setup, config)
        start = int(jax.device_get(state.step))
    elif resumed is None:
        state = create_state(setup, int(train_cfg.seed))
        start = 0
    else:
        latest, state, _ = resumed
        start = int(jax.device_get(state.step))
        if lora_run:
            from fvdm_jax.training.wan_init import base_weights

            state = state.replace(frozen=base_weights(setup, config))
        logging.info("resumed from %s at step %d", ckpt.directory, start)
        if init_from:
            logging.info("train.init_from=%s ignored: %s already has checkpoints (resumed at step %d)",
                         init_from, ckpt.directory, start)

    data_iter = host_batches(
        source,
        global_batch_size=batch_size,
        seed=int(config.data.seed),
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=int(config.data.num_workers),
    )
    # Every global batch is a function of (data.seed, step), whatever the process count: the
    # iterator starts at the resumed step, and checkpoints hold no iterator state.

    step_fn = JittedTrainStep(
        setup.model,
        setup.schedule,
        setup.optimizer,
        train_cfg,
        config.ptss,
        setup.state_shardings,
        setup.batch_shardings,
        mesh=setup.mesh,
        rules=setup.rules,
    )
    logger = MetricsLogger(workdir, start_step=start)
    actions = list(actions(setup.mesh, source) if callable(actions) else actions)
    batches = DevicePrefetcher(
        data_iter, setup.mesh, setup.rules, int(config.data.device_prefetch)
    )
    record = _config_record(config, setup)
    flops_per_video = _train_flops_per_video(config, source)
    peak = _peak_flops(train_cfg)
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(setup.abstract_state.params))
    console.banner("fvdm_jax train", console.training_rows(
        config, model=setup.model, num_params=num_params,
        flops_per_step=None if flops_per_video is None else flops_per_video * batch_size,
        mesh=setup.mesh, source=source, workdir=workdir, start=start, resumed=latest is not None)
        + ([("layout", layout)] if layout else []))
    last_saved = latest
    pending = []
    first_step_sec = None
    agreement = StopAgreement(preemption, config.checkpoint.preemption_check_every_steps)
    stop = agreement.before_first_step(start)  # a signal during restore / compilation
    done = start
    with console.TrainProgress(num_steps, start) as progress:
        for step in range(start, start if stop else num_steps):
            batch = next(batches)
            if step == start:
                started = time.perf_counter()
            state, metrics = step_fn(state, batch)
            if step == start:
                # One sync after the first step: its time is mostly compilation, and the
                # throughput figures start cleanly after it.
                jax.block_until_ready(metrics)
                first_step_sec = time.perf_counter() - started
                logger.rates(step + 1)
            pending.append(metrics)
            done = step + 1
            progress.update(done)
            if step_hook is not None:
                step_hook(done)
            stop = agreement.after_step(done)  # the same step on every process
            final = done == num_steps or stop
            if itstime(done, train_cfg.log_every_steps) or final:
                ckpt.check_for_errors()  # a failed async save stops the run now, in one line
                _check_finite(state, last_saved)
                scalars = _mean_metrics(pending)
                pending = []
                scalars.update(logger.rates(done))
                if first_step_sec is not None and done - start <= int(train_cfg.log_every_steps):
                    scalars["first_step_sec"] = first_step_sec
                if "steps_per_sec" in scalars:
                    scalars["videos_per_sec"] = scalars["steps_per_sec"] * batch_size
                    if flops_per_video and peak:
                        scalars["mfu"] = flops.mfu(flops_per_video * batch_size, 1.0 / scalars["steps_per_sec"],
                                                   peak * setup.mesh.size)
                logger.write(done, scalars)
                progress.log(done, scalars)
            for action in actions:
                if action.due(done):
                    result = action.fn(done, state.ema_params)
                    if action.kind == "images":
                        logger.write_images(done, result)
                        progress.note(done, action.name, ", ".join(sorted(result)))
                    else:
                        logger.write(done, result)
                        progress.note(done, action.name, ", ".join(
                            f"{k} {float(v):.5g}" for k, v in sorted(result.items())))
            if itstime(done, ckpt.every_steps) or final:
                _check_finite(state, last_saved)
                saved = state.replace(frozen=None) if lora_run else state
                if ckpt.save(done, saved, record, force=final):
                    last_saved = done
                    write_plots(workdir)  # plots/loss.png (and fvd.png) as of this checkpoint
            if stop:
                logging.warning("stopped at step %d (%s); checkpoint saved", done, agreement.reason)
                break
    batches.close()
    ckpt.wait_until_finished()  # the stop step's save (and any before it) is finished here
    ckpt.close()
    logger.close()
    return TrainResult(state, done, stop, step_fn.traces, first_step_sec, agreement.exit_code)


def _config_record(config, setup: Setup) -> dict:
    record = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    record["runtime"] = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "mesh_shape": dict(setup.mesh.shape),
    }
    return record


def _train_flops_per_video(config, source=None) -> float | None:
    """Analytic FLOPs of one training step per video (forward + backward: flops.py's conventions;
    a LoRA run's count is of what its step computes). A Wan model's count takes the latent shape
    and text length of the data's first example (`source[0]`), else model.num_frames,
    model.wan.latent_size and data.text_length; None when they are unknown (no MFU)."""
    video_shape = text_length = None
    if (config.model.get("architecture") or "dit") == "wan":
        example = source[0] if source is not None else {}
        if "video" in example:
            video_shape = tuple(example["video"].shape[:3])  # (F, h, w)
        if "context" in example:
            text_length = int(example["context"].shape[0])
        text_length = text_length or config.data.get("text_length")
        if text_length is None:
            return None
    return float(flops.train_step_flops_from_config(
        config.model, config.get("lora"), video_shape=video_shape, text_length=text_length))


def _peak_flops(train_cfg) -> float | None:
    if train_cfg.peak_flops_per_device:
        return float(train_cfg.peak_flops_per_device)
    return flops.peak_flops_per_device(jax.devices()[0].device_kind)
