"""FVD jobs: `--mode=eval` and the periodic FVD of training, with StyleGAN-V's protocol.

Protocol (docs/evaluation.md has the details and what is verified):
- Generated videos are quantized like saved frames, uint8 = (x * 127.5 + 128) clipped to [0, 255]
  and truncated, and the first `num_frames` frames (16; 128 for `extend`) are used.
- Real videos come from the train split. Items are every video, then (with `mirror`) every video
  flipped horizontally, as StyleGAN-V's dataset with xflip; the first `num_videos` items are used
  ('first', StyleGAN-V's order) or a seeded random subset ('random'). Each item is a clip of
  `num_frames` frames with stride `subsample_factor` at a random offset in
  [0, T - num_frames * subsample_factor + subsample_factor - 1] (StyleGAN-V's rule; videos shorter
  than num_frames * subsample_factor are discarded), drawn with np.random.default_rng((seed, item)).
  Frames that are not already resolution x resolution get the dataset's spatial rule
  (fvdm_jax.data.clips) and are rounded to uint8, as a preprocessed frame dataset stores them.
- Both go through `preprocess_for_i3d` (x / 255 * 2 - 1, bilinear 224x224 without antialias) and
  the Kinetics-400 I3D (`i3d_logits`: 400 logits averaged over time), sharded over the mesh's batch
  axes; statistics and the Frechet distance are those of fvdm_jax/fvd.py.
Real statistics are cached in `eval.cache_dir` under a key of everything that defines them.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from fvdm_jax import sharding as shd
from fvdm_jax.data import clips
from fvdm_jax.fvd import (
    FeatureStats,
    batch_features,
    detector_batch_size,
    fvd_from_stats,
    load_detector,
    progress_bar,
    video_set_features,
)
from fvdm_jax.data.fvd_videos import (  # noqa: F401 (re-exported: the public names of the job)
    DemoClips,
    FolderVideos,
    NpzVideos,
    Protocol,
    RealFolderClips,
    SELECTIONS,
    _npz_memmap,
    open_real,
    quantize_generated,
    real_items,
    signed_to_uint8,
    stylegan_v_frame_indices,
    to_resolution,
)
from fvdm_jax.models.i3d import I3D_MIN_FRAMES

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.jsonl"
TASKS = ("generate", "i2v", "interpolate", "extend")
DEFAULT_NUM_FRAMES = 16  # fvd2048_16f
# Bump when the way real clips or features are made changes: old cache entries stop matching.
PROTOCOL_VERSION = 1


class EvalResult(dict):
    """The record of one evaluation; printed as one JSON line."""

    def __str__(self) -> str:
        return json.dumps(self, sort_keys=True)


def real_cache_path(cache_dir: str, real, protocol: Protocol, detector) -> tuple[str, dict]:
    """The cache file of these real statistics and the key it is named after."""
    key = {"version": PROTOCOL_VERSION, "detector": detector.name, "real": real.identity(),
           "count": len(real), **dataclasses.asdict(protocol)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = f"real_fvd{len(real)}_{protocol.num_frames}f_{digest}.npz"
    return os.path.join(cache_dir, name), key


def load_cached(path: str) -> FeatureStats | None:
    return FeatureStats.load(path) if os.path.isfile(path) else None


def save_cached(path: str, key: dict, stats: FeatureStats) -> None:
    """Written by process 0 only, atomically (a temporary file, then os.replace)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path[:-4]}.tmp{uuid.uuid4().hex}.npz"
    stats.save(temporary)
    os.replace(temporary, path)
    with open(path[:-4] + ".json", "w") as f:
        json.dump(key, f, indent=1, sort_keys=True)


def real_statistics(real, protocol: Protocol, detector, cache_dir: str, batch_size: int,
                    num_workers: int) -> tuple[FeatureStats, bool]:
    """(statistics, whether they came from the cache) of a real video set."""
    path, key = real_cache_path(cache_dir, real, protocol, detector)
    stats = load_cached(path)
    if stats is not None:
        logger.info("real statistics from the cache %s", path)
        return stats, True
    stats = video_set_features(detector, real, batch_size, num_workers, "real features")
    save_cached(path, key, stats)
    return stats, False


# ---------------------------------------------------------------------------------------------
# Jobs.


def validate_eval_config(eval_config) -> None:
    """One-line errors for bad eval.* values."""
    if eval_config.task not in TASKS:
        raise ValueError(f"eval.task={eval_config.task!r} is not supported; use one of {', '.join(TASKS)}")
    if eval_config.real_selection not in SELECTIONS:
        raise ValueError(f"eval.real_selection={eval_config.real_selection!r}; use one of {', '.join(SELECTIONS)}")
    for key in ("num_videos", "subsample_factor", "batch_size", "train_num_videos"):
        if int(eval_config[key]) < 1:
            raise ValueError(f"eval.{key}={eval_config[key]} must be at least 1")
    if eval_config.num_frames is not None and eval_config.num_frames < I3D_MIN_FRAMES:
        raise ValueError(f"eval.num_frames={eval_config.num_frames}: I3D needs at least {I3D_MIN_FRAMES} frames")


def _num_frames(config) -> int:
    if config.eval.num_frames is not None:
        return int(config.eval.num_frames)
    return int(config.sample.total_frames) if config.eval.task == "extend" else DEFAULT_NUM_FRAMES


def _protocol(config, num_frames: int, resolution: int, num_videos: int | None = None) -> Protocol:
    ev = config.eval
    return Protocol(num_videos=int(num_videos or ev.num_videos), num_frames=num_frames,
                    subsample_factor=int(ev.subsample_factor), mirror=bool(ev.mirror),
                    selection=str(ev.real_selection), resolution=int(resolution), seed=int(ev.seed))


def _latest_checkpoint_step(workdir: str) -> int:
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=0)


def append_record(workdir: str, record: dict) -> None:
    """One JSON line in WORKDIR/eval.jsonl (process 0)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, EVAL_FILE), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def write_tensorboard(workdir: str, step: int, scalars: dict) -> bool:
    """TensorBoard scalars through clu when it imports (it needs tensorflow); False otherwise."""
    try:
        from clu import metric_writers
    except ImportError as error:
        logger.warning("clu writers unavailable (%s); FVD is in %s only", error, EVAL_FILE)
        return False
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_scalars(step, scalars)
    writer.flush()
    writer.close()
    return True


def _check_generated_frames(frames: int, num_frames: int, where: str) -> None:
    if frames < num_frames:
        raise ValueError(f"{where} makes videos of {frames} frames; FVD here needs eval.num_frames={num_frames}"
                         f" (set eval.num_frames <= {frames}, at least {I3D_MIN_FRAMES})")


def _sampler_inputs(real_videos: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 real clips -> the sampler's pixels in [-1, 1] at its frame size."""
    if real_videos.shape[2:4] != (height, width):
        real_videos = clips.resize_frames(real_videos, height, width)
    return np.asarray(real_videos, np.float32) / np.float32(127.5) - 1.0


def _keep(keep: list | None, videos: np.ndarray, limit: int) -> None:
    """Appends uint8 videos to `keep` until it holds `limit` of them (the verdict's sheets)."""
    if keep is not None and len(keep) < limit:
        keep.extend(videos[: limit - len(keep)])


def generated_features(sampler, num_videos: int, num_frames: int, detector, batch_size: int,
                       seed: int, per_call: int, params=None, keep: list | None = None,
                       keep_count: int = 0) -> FeatureStats:
    """Statistics of `num_videos` videos of task 'generate', sampled `per_call` at a time
    (sample.batch_size) with keys fold_in(key(seed), k); labels as the sampler draws them
    (uniform classes for class-conditional models). params: None = the sampler's own.
    keep: a list that receives the first `keep_count` uint8 videos."""
    key, stats, done = jax.random.key(seed), None, 0
    bar = progress_bar(num_videos, "generated features")
    for k in range(math.ceil(num_videos / per_call)):
        extra = {} if params is None else {"params": params}
        videos = np.asarray(sampler.run("generate", jax.random.fold_in(key, k), batch_size=per_call, **extra))
        _check_generated_frames(videos.shape[1], num_frames, "the sampler")
        take = min(per_call, num_videos - done)
        quantized = quantize_generated(videos[:take, :num_frames])
        _keep(keep, quantized, keep_count)
        stats = batch_features(detector, quantized, batch_size, stats)
        done += take
        if bar is not None:
            bar.update(take)
    if bar is not None:
        bar.close()
    return stats


def zero_shot_features(config, sampler, real, num_frames: int, detector, batch_size: int,
                       real_stats: FeatureStats | None, conditional: bool,
                       keep: list | None = None, keep_count: int = 0):
    """Generates from the real clips' frames (i2v: frame 0; interpolate: first and last frame;
    extend: the first sample.overlap (None: N // 2) frames) and returns (generated stats, real
    stats), the real ones computed from the same clips unless given. keep: a list that receives
    the first `keep_count` generated uint8 videos."""
    task, ev = config.eval.task, config.eval
    frames, height, width = sampler.pixel_shape[:3]
    if task in ("i2v", "interpolate") and frames != num_frames:
        raise ValueError(f"eval.task={task} conditions the model's {frames}-frame window on real "
                         f"clips; set eval.num_frames={frames}")
    context = int(config.sample.overlap or frames // 2)
    per_call = int(config.sample.batch_size)
    key, fake_stats, new_real = jax.random.key(int(ev.seed)), None, None
    bar = progress_bar(len(real), f"{task} features")
    with ThreadPoolExecutor(max(1, int(ev.num_workers))) as pool:
        for k, start in enumerate(range(0, len(real), per_call)):
            rows = list(range(start, min(start + per_call, len(real))))
            loaded = list(pool.map(real.read, rows + [rows[-1]] * (per_call - len(rows))))
            real_videos = np.stack([video for video, _ in loaded])
            labels = np.asarray([label for _, label in loaded], np.int32)
            inputs = _sampler_inputs(real_videos[:, :context] if task == "extend" else real_videos, height, width)
            videos = np.asarray(sampler.run(task, jax.random.fold_in(key, k), inputs=inputs,
                                            labels=labels if conditional else None, batch_size=per_call))
            _check_generated_frames(videos.shape[1], num_frames, f"eval.task={task}")
            quantized = quantize_generated(videos[: len(rows), :num_frames])
            _keep(keep, quantized, keep_count)
            fake_stats = batch_features(detector, quantized, batch_size, fake_stats)
            if real_stats is None:
                new_real = batch_features(detector, real_videos[: len(rows)], batch_size, new_real)
            if bar is not None:
                bar.update(len(rows))
    if bar is not None:
        bar.close()
    return fake_stats, real_stats if real_stats is not None else new_real


def eval_job(config, workdir: str) -> EvalResult:
    """FVD of generated videos (eval.generated, or sampled now from WORKDIR's checkpoint) against
    real videos; appends the record to WORKDIR/eval.jsonl and TensorBoard and returns it."""
    ev = config.eval
    validate_eval_config(ev)
    started = time.perf_counter()
    mesh = shd.make_mesh(config.mesh)
    num_frames = _num_frames(config)
    cache_dir = ev.cache_dir or os.path.join(workdir, "fvd_cache")
    timings, task, sampler, num_classes = {}, ev.task, None, 0

    if ev.generated:
        if os.path.isdir(ev.generated):
            fake = FolderVideos(ev.generated, num_frames, int(ev.num_videos), ev.resolution)
        elif os.path.isfile(ev.generated):
            fake = NpzVideos(ev.generated, num_frames, int(ev.num_videos))
            task = fake.task or task
        else:
            raise FileNotFoundError(f"eval.generated={ev.generated} does not exist")
        resolution = int(ev.resolution or fake.resolution)
        num_fake = len(fake)
    else:
        from fvdm_jax.sample import VideoSampler, load_sampling_params

        model_config, diffusion_config, params = load_sampling_params(config, workdir)
        sampler = VideoSampler(config, params, mesh=mesh, model_config=model_config,
                               diffusion_config=diffusion_config)
        num_classes = int(model_config.get("num_classes") or 0)
        resolution = int(ev.resolution or sampler.pixel_shape[1])
        window = int(sampler.pixel_shape[0])
        if task in ("i2v", "interpolate") and window != num_frames:
            raise ValueError(f"eval.task={task} conditions the model's {window}-frame window on real "
                             f"clips; set eval.num_frames={window}")
        made = int(config.sample.total_frames) if task == "extend" else window
        _check_generated_frames(made, num_frames, f"eval.task={task}")
    detector = load_detector(ev.detector, mesh, shd.rules_from_config(config.mesh))
    batch = detector_batch_size(int(ev.batch_size), num_frames, detector.batch_divisor)
    protocol = _protocol(config, num_frames, resolution)
    conditional = sampler is not None and task != "generate" and num_classes > 0
    real = open_real(config, protocol, labels=conditional)
    logger.info("real videos: %s", real.describe())
    cache_path, cache_key = real_cache_path(cache_dir, real, protocol, detector)
    real_stats = load_cached(cache_path)
    cached = real_stats is not None

    clock = time.perf_counter()
    if sampler is not None and task != "generate":
        fake_stats, real_stats = zero_shot_features(config, sampler, real, num_frames, detector, batch,
                                                    real_stats, conditional)
        num_fake = len(real)
        timings["seconds_generated"] = time.perf_counter() - clock
    else:
        if real_stats is None:
            real_stats = video_set_features(detector, real, batch, int(ev.num_workers), "real features")
        timings["seconds_real"] = time.perf_counter() - clock
        clock = time.perf_counter()
        if sampler is None:
            logger.info("generated videos: %s", fake.describe())
            fake_stats = video_set_features(detector, fake, batch, int(ev.num_workers), "generated features")
        else:
            num_fake = int(ev.num_videos)
            fake_stats = generated_features(sampler, num_fake, num_frames, detector, batch, int(ev.seed),
                                            int(config.sample.batch_size))
        timings["seconds_generated"] = time.perf_counter() - clock
    if not cached:
        save_cached(cache_path, cache_key, real_stats)

    fvd = fvd_from_stats(real_stats, fake_stats)
    protocol_name = f"fvd{num_fake}_{num_frames}f"
    metric = protocol_name if task == "generate" else f"{protocol_name}_{task}"
    step = _latest_checkpoint_step(workdir)
    record = EvalResult(
        metric=metric, fvd=fvd, protocol=protocol_name, task=task, step=step,
        num_generated=num_fake, num_real=int(real_stats.count), real=real.describe(),
        generated=ev.generated or "sampled from the checkpoint", real_cached=cached,
        cache=cache_path, detector=detector.name, time=datetime.datetime.now().isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started, **timings, **dataclasses.asdict(protocol),
    )
    append_record(workdir, record)
    write_tensorboard(workdir, step, {f"eval/{metric}": fvd})
    return record


_TRAINING_REAL: dict[str, FeatureStats] = {}
_TRAINING_SAMPLERS: dict[Any, Any] = {}


def _training_sampler(config, mesh):
    """One VideoSampler per (config, mesh) and process: it compiles once; params come per call."""
    from fvdm_jax.sample import VideoSampler

    key = (config.to_json_best_effort(sort_keys=True), mesh)
    if key not in _TRAINING_SAMPLERS:
        _TRAINING_SAMPLERS[key] = VideoSampler(config, None, mesh=mesh)
    return _TRAINING_SAMPLERS[key]


def training_fvd(config, workdir: str, step: int, params, mesh) -> dict[str, float]:
    """FVD of eval.train_num_videos generated videos (the model's frames, task 'generate') against as
    many real clips, for training: {'fvd{N}_{F}f': value}. Real statistics are cached on disk and in
    memory, the I3D weights loaded once per process. params: the EMA parameters (may be sharded)."""
    ev = config.eval
    validate_eval_config(ev)
    started = time.perf_counter()
    rules = shd.rules_from_config(config.mesh)
    detector = load_detector(ev.detector, mesh, rules)
    sampler = _training_sampler(config, mesh)
    num_frames, height = int(sampler.pixel_shape[0]), int(sampler.pixel_shape[1])
    if num_frames < I3D_MIN_FRAMES:
        raise ValueError(f"FVD during training: the model makes {num_frames}-frame videos, I3D needs "
                         f">= {I3D_MIN_FRAMES}; set eval.every_steps=0")
    num = int(ev.train_num_videos)
    protocol = _protocol(config, num_frames, int(ev.resolution or height), num_videos=num)
    batch = detector_batch_size(int(ev.batch_size), num_frames, detector.batch_divisor)
    memory_key = json.dumps([dataclasses.asdict(protocol), ev.real_path, ev.split, config.data.get("path"),
                             config.data.source, detector.name], sort_keys=True)
    real_stats = _TRAINING_REAL.get(memory_key)
    if real_stats is None:
        real = open_real(config, protocol)
        cache_dir = ev.cache_dir or os.path.join(workdir, "fvd_cache")
        real_stats, _ = real_statistics(real, protocol, detector, cache_dir, batch, int(ev.num_workers))
        _TRAINING_REAL[memory_key] = real_stats
    fake_stats = generated_features(sampler, num, num_frames, detector, batch, int(ev.seed),
                                    int(config.sample.batch_size), params=params)
    fvd = fvd_from_stats(real_stats, fake_stats)
    name = f"fvd{num}_{num_frames}f"
    append_record(workdir, {"metric": name, "fvd": fvd, "step": int(step), "task": "generate",
                            "num_generated": num, "num_real": int(real_stats.count), "training": True,
                            "detector": detector.name, "seconds": time.perf_counter() - started,
                            "time": datetime.datetime.now().isoformat(timespec="seconds"),
                            **dataclasses.asdict(protocol)})
    return {name: fvd}
