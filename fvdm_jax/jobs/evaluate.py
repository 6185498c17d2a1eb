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
  axes; statistics and the Frechet distance are those of fvdm_jax/evaluation/fvd.py.
Real statistics are cached in `eval.cache_dir` under a key of everything that defines them.
`eval.protocol` names the protocol of a published number (fvdm_jax/evaluation/features.py
PROTOCOLS): it fixes the task, frames, stride, mirror and real clips before anything runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time

from fvdm_jax.diffusion import tasks
from fvdm_jax.errors import ConfigError
from fvdm_jax.evaluation import features
from fvdm_jax.evaluation.features import check_generated_frames, protocol_from_config
from fvdm_jax.evaluation.fvd import detector_batch_size, fvd_from_stats, load_detector, video_set_features
from fvdm_jax.evaluation.records import EvalResult, append_record, latest_checkpoint_step, write_tensorboard
from fvdm_jax.evaluation.videos import FolderVideos, NpzVideos, open_real
from fvdm_jax.runtime import metrics
from fvdm_jax.runtime import sharding as shd

logger = logging.getLogger(__name__)

DEFAULT_NUM_FRAMES = 16  # fvd2048_16f
DEFAULT_TASK = "generate"  # configs/default.py eval.task


def _num_frames(config) -> int:
    if config.eval.num_frames is not None:
        return int(config.eval.num_frames)
    return int(config.sample.total_frames) if tasks.get_task(config.eval.task).long else DEFAULT_NUM_FRAMES


def scored_task(path: str, file_task: str | None, eval_task: str, requested_task: str) -> str:
    """The task a given videos file (eval.generated=PATH.npz) is scored as: its metric name
    (fvd2048_16f_i2v) and the record's task.

    The file's 'task' entry (the sampling job writes sample.task) is metadata, and metadata that
    this project cannot read must not stop an evaluation:
    - no entry: eval.task;
    - an entry that names no task of this project (another tool's, e.g. 'reference'): eval.task,
      and one log line says the file's entry was ignored;
    - a task of this project: that task when eval.task, as given, is the default 'generate' (so a
      samples.npz of sample.task=i2v scores as i2v without more flags) or the same task. When
      eval.task was set to another task (i2v, interpolate, extend), the two truly conflict: a
      one-line ConfigError. (eval.task=generate given explicitly cannot be told from the default:
      the file's task wins.)
    eval_task: eval.task after eval.protocol resolved it; requested_task: eval.task as given."""
    if file_task is None or file_task == eval_task:
        return eval_task
    if file_task not in tasks.TASKS:
        logger.warning("eval.generated=%s: its task entry %r is not a task of this project (another "
                       "tool's metadata?); ignored, scoring as eval.task=%s", path, file_task, eval_task)
        return eval_task
    if requested_task not in (DEFAULT_TASK, file_task):
        raise ConfigError(f"eval.generated={path} holds videos of task {file_task!r} (its 'task' entry), "
                          f"but eval.task={requested_task!r}; set eval.task={file_task}, or leave eval.task "
                          f"at its default to score the file's task")
    return file_task


def eval_job(config, workdir: str) -> EvalResult:
    """FVD of generated videos (eval.generated, or sampled now from WORKDIR's checkpoint) against
    real videos; appends the record to WORKDIR/eval.jsonl and TensorBoard and returns it."""
    requested_task = config.eval.task  # as given, before a named protocol fixes it
    # A named protocol (eval.protocol) fixes its task, frames, real clips and stride.
    config, named = features.resolve_protocol(config)
    ev = config.eval
    if named.clips == "sample_script" and ev.generated:
        raise ConfigError(f"eval.protocol={named.name} samples from the ground-truth clips it compares "
                          f"with; unset eval.generated (or compare two folders with eval.protocol=stylegan_v)")
    started = time.perf_counter()
    mesh = shd.make_mesh(config.mesh)
    num_frames = _num_frames(config)
    cache_dir = ev.cache_dir or os.path.join(workdir, "fvd_cache")
    if ev.generated:
        sampler, num_classes = None, 0
        fake, task, resolution = _open_generated(ev, num_frames, requested_task)
    else:
        fake, task = None, ev.task
        sampler, num_classes, resolution = _load_sampler(config, workdir, mesh, num_frames)
    detector = load_detector(ev.detector, mesh, shd.rules_from_config(config.mesh))
    batch = detector_batch_size(int(ev.batch_size), num_frames, detector.batch_divisor)
    protocol = protocol_from_config(config, num_frames, resolution, named=named)
    zero_shot = tasks.get_task(task).evaluation != "none" and not named.from_noise
    conditional = sampler is not None and zero_shot and num_classes > 0
    real = open_real(config, protocol, labels=conditional)
    logger.info("real videos: %s", real.describe())
    cache_path, cache_key = features.real_cache_path(cache_dir, real, protocol, detector)
    real_stats = features.load_cached(cache_path)
    cached = real_stats is not None
    real_stats, fake_stats, num_fake, timings = _video_stats(
        config, detector, batch, real, real_stats, fake, sampler, num_frames, task,
        zero_shot=zero_shot, conditional=conditional,
    )
    if not cached:
        features.save_cached(cache_path, cache_key, real_stats)

    fvd = fvd_from_stats(real_stats, fake_stats)
    protocol_name = f"fvd{num_fake}_{num_frames}f"
    metric = protocol_name if task == "generate" or named.from_noise else f"{protocol_name}_{task}"
    step = latest_checkpoint_step(workdir)
    record = EvalResult(
        metric=metric, fvd=fvd, protocol=protocol_name, eval_protocol=named.name, task=task, step=step,
        num_generated=num_fake, num_real=int(real_stats.count), real=real.describe(),
        generated=ev.generated or "sampled from the checkpoint", real_cached=cached,
        cache=cache_path, detector=detector.name, time=datetime.datetime.now().isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started, **timings, **dataclasses.asdict(protocol),
    )
    append_record(workdir, record)
    write_tensorboard(workdir, step, {f"eval/{metric}": fvd})
    metrics.write_plots(workdir)  # plots/fvd.png of the FVD that ran during training, if any
    return record


def _open_generated(ev, num_frames: int, requested_task: str):
    """(the videos of eval.generated, a folder or an .npz file; the task they are scored as; the
    resolution)."""
    task = ev.task
    if os.path.isdir(ev.generated):
        fake = FolderVideos(ev.generated, num_frames, int(ev.num_videos), ev.resolution)
    elif os.path.isfile(ev.generated):
        fake = NpzVideos(ev.generated, num_frames, int(ev.num_videos))
        task = scored_task(ev.generated, fake.task, task, requested_task)
    else:
        raise FileNotFoundError(f"eval.generated={ev.generated} does not exist")
    return fake, task, int(ev.resolution or fake.resolution)


def _load_sampler(config, workdir: str, mesh, num_frames: int):
    """(the VideoSampler of WORKDIR's checkpoint, the model's number of classes, the resolution);
    checks that it makes the frames eval.task scores."""
    from fvdm_jax.sampling.sampler import VideoSampler
    from fvdm_jax.sampling.weights import load_sampling_params

    ev, task = config.eval, config.eval.task
    model_config, diffusion_config, params = load_sampling_params(config, workdir)
    sampler = VideoSampler.from_config(config, params, mesh=mesh, model_config=model_config,
                                       diffusion_config=diffusion_config)
    num_classes = int(model_config.get("num_classes") or 0)
    resolution = int(ev.resolution or sampler.pixel_shape[1])
    window = int(sampler.pixel_shape[0])
    if tasks.get_task(task).evaluation == "window" and window != num_frames:
        raise ConfigError(f"eval.task={task} conditions the model's {window}-frame window on real "
                         f"clips; set eval.num_frames={window}")
    made = int(config.sample.total_frames) if tasks.get_task(task).long else window
    check_generated_frames(made, num_frames, f"eval.task={task}")
    return sampler, num_classes, resolution


def _video_stats(config, detector, batch, real, real_stats, fake, sampler, num_frames, task, *, zero_shot,
                 conditional):
    """(real statistics, generated statistics, number of generated videos, timings): the real ones
    computed unless `real_stats` came from the cache; the generated ones from `fake` (eval.generated)
    or made by `sampler`, zero-shot tasks on the real clips themselves."""
    ev, timings = config.eval, {}
    clock = time.perf_counter()
    if sampler is not None and zero_shot:
        fake_stats, real_stats = features.zero_shot_features(config, sampler, real, num_frames, detector, batch,
                                                    real_stats, conditional)
        timings["seconds_generated"] = time.perf_counter() - clock
        return real_stats, fake_stats, len(real), timings
    if real_stats is None:
        real_stats = video_set_features(detector, real, batch, int(ev.num_workers), "real features")
    timings["seconds_real"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if sampler is None:
        logger.info("generated videos: %s", fake.describe())
        num_fake = len(fake)
        fake_stats = video_set_features(detector, fake, batch, int(ev.num_workers), "generated features")
    else:
        num_fake = int(ev.num_videos)
        fake_stats = features.generated_features(sampler, num_fake, num_frames, detector, batch, int(ev.seed),
                                        int(config.sample.batch_size), task=task)
    timings["seconds_generated"] = time.perf_counter() - clock
    return real_stats, fake_stats, num_fake, timings
