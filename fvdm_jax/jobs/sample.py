"""--mode=sample: mass generation of any task, resumable batch by batch.

Fixed-size batches (one compilation), each batch a function of (seed, batch index) written
atomically, so an interrupted job resumes where it stopped; MP4 / GIF per video, a PNG contact
sheet per batch, `samples.npz` for evaluation and `sample.json` (settings, timings).
"""

from __future__ import annotations

import json
import logging
import math
import time

import jax
import numpy as np

from fvdm_jax.data import media
from fvdm_jax.diffusion import tasks
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.build import architecture_of
from fvdm_jax.runtime import files
from fvdm_jax.sampling.sampler import VideoSampler, parse_ints
from fvdm_jax.sampling.weights import load_sampling_params

DATA_INPUTS = "data"  # sample.inputs value: clips of config.data, also for extend / progressive


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
        task = tasks.get_task(self.task)
        wants = task.needs_inputs or (task.takes_inputs and spec)
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
        overlap = tasks.get_task("transition").overlap(n, s.overlap)
        if clips is not None:
            overlap = min([overlap] + [c.shape[0] for c in clips])
        if 2 * overlap >= n:
            raise ConfigError(f"transition overlap={overlap} must be < num_frames / 2 = {n / 2}")
        return overlap

    def _arrange(self, clips, sampler, s):
        if self.task in ("i2v", "progressive"):
            return [c[:1] for c in clips]
        if self.task == "transition":
            if len(clips) != 2:
                raise ConfigError(
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
    sampler = "euler" if architecture_of(config.model) == "wan" else s.sampler  # flow: Euler
    # A URL (gs://...) stays a URL: every write below goes through fvdm_jax.runtime.files.
    return s.output_dir or files.join(
        workdir, "samples", f"{s.task}_{sampler}{s.num_steps}{_conditioning_tag(s)}_seed{s.seed}"
    )


def _conditioning_tag(s) -> str:
    """'' for the default conditioning, else '_<policy>' and '_hg<scale>' ('f<level>' appended
    for fractional history guidance), so a sweep of these options gets one folder per value."""
    tag = "" if s.policy == "hold" else f"_{s.policy}"
    scale = float(s.get("history_guidance") or 0.0)
    if scale:
        tag += f"_hg{scale:g}"
        if s.get("history_guidance_mode") == "fractional":
            tag += f"f{s.history_noise_level}"
    return tag


def weights_identity(config, workdir: str) -> str:
    """Which weights a job samples with: the inference checkpoint's path, or the training step of
    WORKDIR's latest checkpoint (more training must not mix into an earlier job's batches)."""
    if config.sample.get("checkpoint"):
        return files.resolve(config.sample.checkpoint)
    from fvdm_jax.checkpoint.manager import TrainCheckpointer

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


class _DitRun:
    """A DiT job's batches: pixel videos and class labels (VideoSampler + JobInputs)."""

    def __init__(self, config, workdir: str):
        self.model_config, diffusion_config, params = load_sampling_params(config, workdir)
        self.sampler = VideoSampler.from_config(config, params, model_config=self.model_config,
                                                diffusion_config=diffusion_config)
        self.inputs = JobInputs(config, self.sampler, workdir)
        self.task, self.batch_size = config.sample.task, int(config.sample.batch_size)
        self.settings = {}

    def videos(self, rng, indices) -> tuple[np.ndarray, np.ndarray | None, dict]:
        kwargs, labels = self.inputs.batch(indices)
        videos = self.sampler.run(self.task, rng, labels=labels, batch_size=self.batch_size,
                                  **kwargs)
        return videos, labels, {}

    def compilations(self) -> int:
        return self.sampler.compilations()


class _WanRun:
    """A Wan job's batches: latents of the prompts (and given frames), decoded to pixels by the
    Wan VAE (encoders.vae) or shown as a latent preview."""

    def __init__(self, config, workdir: str):
        from fvdm_jax.sampling.wan_job import WanJob

        self.job = WanJob(config, workdir)
        self.model_config = self.job.model_config
        self.settings = {"encoders": self.job.settings()}

    def videos(self, rng, indices) -> tuple[np.ndarray, None, dict]:
        latents = self.job.latents(rng, indices)
        return self.job.pixels(latents), None, {"latents": latents}

    def compilations(self) -> int:
        return self.job.compilations()


def sample_job(config, workdir: str) -> str:
    """--mode=sample: writes OUT/samples.npz (returned), MP4/GIF/PNG media and OUT/sample.json."""
    s = config.sample
    run = (_WanRun if architecture_of(config.model) == "wan" else _DitRun)(config, workdir)
    model_config = run.model_config
    out = output_dir(config, workdir)
    batches_dir, media_dir = files.join(out, "batches"), files.join(out, "media")
    is_main = jax.process_index() == 0
    record = {**_record(config, model_config, weights_identity(config, workdir)), **run.settings}
    record_path = files.join(out, "sample.json")
    if files.exists(record_path):
        with files.open_file(record_path) as f:
            previous = json.load(f)
        if previous.get("settings") != record:
            raise ConfigError(
                f"{out} holds samples made with other settings or weights; choose another "
                f"--config.sample.output_dir or remove it"
            )
    num_videos, batch = int(s.num_videos), int(s.batch_size)
    num_batches = math.ceil(num_videos / batch)
    if is_main:
        files.makedirs(batches_dir)
        if s.save_media:
            files.makedirs(media_dir)
    seed_key = jax.random.key(int(s.seed))
    timings = []
    bar = files.progress(num_batches, f"sampling {s.task}", unit="batch", leave=True)
    for k in range(num_batches):
        path = files.join(batches_dir, f"batch_{k:05d}.npz")
        if bar is not None:
            bar.update(1)
        if files.exists(path):
            continue  # done before an interruption: every batch is a function of (seed, k)
        indices = list(range(k * batch, (k + 1) * batch))
        started = time.perf_counter()
        videos, labels, extra = run.videos(jax.random.fold_in(seed_key, k), indices)
        timings.append(time.perf_counter() - started)
        keep = min(batch, num_videos - k * batch)
        videos = media.to_uint8(videos[:keep])
        if labels is None:
            labels = np.zeros((batch,), np.int32)
        if is_main:
            files.savez(path, videos=videos, labels=np.asarray(labels[:keep], np.int32),
                        **{name: value[:keep] for name, value in extra.items()})
            if s.save_media:
                media.write_media(media_dir, videos, k * batch, int(s.fps), f"batch_{k:05d}",
                            int(s.sheet_frame_size))
    if bar is not None:
        bar.close()
    if not is_main:
        return files.join(out, "samples.npz")
    arrays = {}
    for k in range(num_batches):
        path = files.join(batches_dir, f"batch_{k:05d}.npz")
        with files.open_file(path, "rb") as f, np.load(f) as data:
            for name in data.files:
                arrays.setdefault(name, []).append(data[name])
    arrays = {name: np.concatenate(parts)[:num_videos] for name, parts in arrays.items()}
    videos = arrays["videos"]
    final = files.join(out, "samples.npz")
    files.savez(final, **arrays, task=np.asarray(s.task))
    steady = timings[1:]
    info = {
        "settings": record,
        "num_videos": int(videos.shape[0]),
        "shape": list(videos.shape),
        "batches_sampled_now": len(timings),
        "first_batch_sec": timings[0] if timings else None,  # includes compilation
        "sec_per_batch": float(np.mean(steady)) if steady else None,
        "sec_per_video": float(np.mean(steady)) / batch if steady else None,
        "compilations": run.compilations(),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    files.write_json(record_path, info, indent=2, sort_keys=False)
    logging.info("wrote %d videos %s to %s", videos.shape[0], videos.shape[1:], final)
    return final
