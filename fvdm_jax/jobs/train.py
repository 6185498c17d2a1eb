"""--mode=train: the training loop with its periodic actions, then what a finished run shows.

The job builds the loop's `PeriodicAction`s from config.sample / config.eval: contact sheets and
videos of sample.train_tasks every sample.every_steps (`TrainingSamples`), FVD every
eval.every_steps (fvdm_jax/jobs/evaluate.py). After a completed run: the plots and, with
eval.after_training, the verdict; after every run, the summary (fvdm_jax/jobs/report.py).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from fvdm_jax import console, files, media
from fvdm_jax.diffusion import tasks
from fvdm_jax.jobs.sample import write_media
from fvdm_jax.sampling.sampler import VideoSampler
from fvdm_jax.train import PeriodicAction, TrainResult, train


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
            from fvdm_jax.jobs.evaluate import training_fvd

            actions.append(PeriodicAction(
                "fvd", every, lambda step, params: training_fvd(config, workdir, step, params, mesh)))
        return actions

    return build


def train_job(config, workdir: str, **kwargs) -> TrainResult:
    """Validates what the run will need, trains (resuming), and after a completed run writes the
    plots and the verdict; then the summary of where everything is (also after a preempted
    run). kwargs go to `train` (devices, step_hook)."""
    from fvdm_jax.jobs.report import finish_training, summary_rows, validate_verdict_config

    validate_verdict_config(config.eval)
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
        self.sheet_frame_size = int(s.get("sheet_frame_size", 1))
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
                write_media(task_dir, videos, 0, self.fps, "contact_sheet", self.sheet_frame_size)
        return images
