"""--mode=train: the training loop with its periodic actions, then what a finished run shows.

The job builds the loop's `PeriodicAction`s from config.sample / config.eval: contact sheets and
videos of sample.train_tasks every sample.every_steps (`TrainingSamples`), FVD every
eval.every_steps (fvdm_jax/evaluation/during_training.py). After a completed run: the plots
(WORKDIR/plots/) and, with eval.after_training, the verdict (fvdm_jax/evaluation/verdict.py);
after every run, also a preempted one, the summary (`summary_rows`): the final loss and where the
checkpoints, exports, samples, verdict, plots, metrics and TensorBoard events are.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from fvdm_jax.data import media
from fvdm_jax.diffusion import tasks
from fvdm_jax.evaluation.during_training import training_fvd
from fvdm_jax.evaluation.verdict import verdict
from fvdm_jax.runtime import console, files, metrics
from fvdm_jax.sampling.sampler import VideoSampler
from fvdm_jax.training.loop import PeriodicAction, TrainResult, train


def periodic_actions(config, workdir: str):
    """The factory (mesh, data source) -> actions that `train` calls once it has both."""

    def build(mesh, source):
        actions = []
        every = int(config.sample.get("every_steps") or 0)
        if every:
            actions.append(PeriodicAction("samples", every, TrainingSamples(config, workdir, mesh, source),
                                          kind="images"))
        every = int(config.eval.get("every_steps") or 0)
        if every:
            actions.append(PeriodicAction(
                "fvd", every, lambda step, params: training_fvd(config, workdir, step, params, mesh)))
        return actions

    return build


def train_job(config, workdir: str, **kwargs) -> TrainResult:
    """Trains (resuming) a validated config, and after a completed run writes the
    plots and the verdict; then the summary of where everything is (also after a preempted
    run). kwargs go to `train` (devices, step_hook)."""
    started = time.perf_counter()
    result = train(config, workdir, actions=periodic_actions(config, workdir), **kwargs)
    if not result.preempted:
        finish_training(config, workdir)
    if jax.process_index() == 0:
        title = "fvdm_jax train: done" if not result.preempted else (
            f"fvdm_jax train: stopped at step {result.step} (exit {result.exit_code}); rerun the "
            f"same command to resume")
        console.summary(title, summary_rows(workdir, steps=result.step,
                                            seconds=time.perf_counter() - started,
                                            compilations=result.compilations))
    return result


class TrainingSamples:
    """Every sample.every_steps: sample.train_num_videos videos of each of sample.train_tasks with
    the EMA weights (same noise and inputs every time, so runs show progress), written to
    WORKDIR/samples/step_N/ and returned as contact-sheet images for TensorBoard."""

    def __init__(self, config, workdir: str, mesh, source):
        s = config.sample
        self.workdir = workdir
        self.tasks = tuple(s.train_tasks)
        self.fps = int(s.fps)
        self.sheet_frame_size = int(s.sheet_frame_size)
        self.sampler = VideoSampler.from_config(config, None, mesh=mesh)
        count = int(s.train_num_videos)
        self.batch = count
        needs = any(tasks.get_task(t).needs_inputs for t in self.tasks)
        self.clips = None
        self.labels = None
        if needs or self.sampler.num_classes:
            items = [source[i] for i in range(count)]
            self.clips = np.stack([item["video"] for item in items])
            if self.sampler.num_classes:
                self.labels = np.asarray([item["label"] for item in items], np.int32)
        self.key = jax.random.key(int(s.seed))

    def __call__(self, step: int, ema_params) -> dict[str, np.ndarray]:
        directory = files.join(self.workdir, "samples", f"step_{step}")
        images = {}
        for task in self.tasks:
            kwargs = {"model_inputs": self.clips} if tasks.get_task(task).needs_inputs else {}
            videos = self.sampler.run(task, self.key, labels=self.labels, batch_size=self.batch,
                                      params=ema_params, **kwargs)
            videos = media.to_uint8(videos)
            scale = media.sheet_scale(videos.shape[2], self.sheet_frame_size)
            images[f"samples/{task}"] = media.frame_grid(videos, scale=scale)
            if jax.process_index() == 0:
                task_dir = files.join(directory, task)
                files.makedirs(task_dir)
                media.write_media(task_dir, videos, 0, self.fps, "contact_sheet", self.sheet_frame_size)
        return images


def _g4(value: float) -> str:
    return f"{value:.4g}"


def _listing(workdir: str, folder: str) -> list[str]:
    path = files.join(workdir, folder) if folder else workdir
    try:
        return files.listdir(path) if files.isdir(path) else []
    except OSError:
        return []


def summary_rows(workdir: str, *, steps: int, seconds: float | None, compilations: int) -> list[tuple[str, str]]:
    """The end of a training run (printed by fvdm_jax.runtime.console.summary): the final loss, and
    where the checkpoints, exports, samples, verdict, plots, metrics and TensorBoard events are
    (what `workdir` holds now)."""
    rows = [r for r in metrics.read_rows(workdir) if "loss" in r]
    out = []
    if rows:
        last = rows[-1]
        terms = ", ".join(f"{k} {_g4(last[k])}" for k in ("mse", "vb") if k in last)
        out.append(("final loss", f"{_g4(last['loss'])}" + (f" ({terms})" if terms else "")
                    + f" at step {last['step']}"))
    timing = f"at step {steps}" + (f" after {console.duration(seconds)} (this run)" if seconds is not None else "")
    out.append(("run", f"{timing}; the train step compiled {compilations} time(s)"))
    saved = sorted(int(n) for n in _listing(workdir, "checkpoints") if n.isdigit())
    if saved:
        out.append(("checkpoints", f"{files.join(workdir, 'checkpoints')} (steps "
                    f"{', '.join(map(str, saved))})"))
    exports = _listing(workdir, "export")
    out.append(("exports", f"{files.join(workdir, 'export')} ({', '.join(exports)})" if exports
                else "none yet: --mode=export writes the EMA weights to WORKDIR/export/step_N"))
    if _listing(workdir, "samples"):
        out.append(("samples", files.join(workdir, "samples")))
    if _listing(workdir, "verdict"):
        out.append(("verdict", f"{files.join(workdir, 'verdict')}/<task>.png, "
                    f"{files.join(workdir, 'eval.jsonl')}"))
    plots = [name for name in _listing(workdir, metrics.PLOTS_DIR) if name.endswith(".png")]
    if plots:
        out.append(("loss curve" if "loss.png" in plots else "plots",
                    ", ".join(files.join(workdir, metrics.PLOTS_DIR, name) for name in plots)))
    out.append(("metrics", files.join(workdir, metrics.METRICS_FILE)))
    events = any(n.startswith("events.out.tfevents") for n in _listing(workdir, ""))
    if events:
        out.append(("tensorboard", f"tensorboard --logdir {workdir}"))
    else:
        out.append(("tensorboard", "no events (clu / tensorflow not installed): metrics.jsonl only"))
    return out


def finish_training(config, workdir: str) -> None:
    """After a completed training run: the plots (WORKDIR/plots/), then the verdict if
    eval.after_training. The run's summary (fvdm_jax/runtime/console.py) names where everything is."""
    metrics.write_plots(workdir)
    if tuple(config.eval.get("after_training") or ()):
        verdict(config, workdir)
