"""The statistics FVD compares: real-set statistics (cached), generated and zero-shot features.

Generated videos are quantized like saved frames (uint8 = (x * 127.5 + 128) clipped and
truncated) and cut to their first `num_frames` frames. Zero-shot tasks are fed real clips as the
task registry says (fvdm_jax/diffusion/tasks.py, `Task.evaluation`): 'window' tasks (i2v,
interpolate) the clip of the model's window, 'context' tasks (extend) its first sample.overlap
frames. Real statistics are cached in `eval.cache_dir` under a key of everything that defines them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from fvdm_jax.data import clips
from fvdm_jax.data.media import to_uint8
from fvdm_jax.diffusion import tasks
from fvdm_jax.errors import ConfigError
from fvdm_jax.evaluation.fvd import FeatureStats, batch_features, video_set_features
from fvdm_jax.evaluation.videos import Protocol
from fvdm_jax.models.i3d import I3D_MIN_FRAMES
from fvdm_jax.runtime import files

logger = logging.getLogger(__name__)

# Bump when the way real clips or features are made changes: old cache entries stop matching.
PROTOCOL_VERSION = 1
# The verdict after training (fvdm_jax/evaluation/verdict.py): the tasks it can score and the baseline
# video sets it scores beside them (noise, real clips with shuffled frames, other real clips).
VERDICT_TASKS = ("generate", "i2v", "interpolate")
BASELINES = ("noise", "shuffled", "real")


@dataclasses.dataclass(frozen=True)
class NamedProtocol:
    """An evaluation protocol by name (eval.protocol): the eval / sample values it fixes (None:
    the config's), per dataset where the official scripts differ by dataset."""

    name: str
    origin: str  # where its numbers come from
    tasks: tuple[str, ...] | None = None  # the eval.task values it scores (None: any)
    task: str | None = None  # the task it runs (None: eval.task)
    from_noise: bool = False  # a long video sampled from noise (no real context)
    num_frames: int | None = None
    subsample_factor: dict[str, int] | int | None = None  # by data.dataset, or for all
    mirror: bool | None = None
    clips: str = "stylegan_v"  # the real clips: 'stylegan_v' or 'sample_script' (videos.py)
    frame_interval: dict[str, int] | None = None  # sample_script clips, by data.dataset
    sample: tuple[tuple[str, int], ...] = ()  # sample.* keys it fixes

    def value(self, table, dataset: str | None, key: str):
        if not isinstance(table, dict):
            return table
        if dataset not in table:
            raise ConfigError(f"eval.protocol={self.name} fixes {key} per dataset ({table}); set "
                              f"data.dataset to one of {', '.join(table)}")
        return table[dataset]


# StyleGAN-V's fvd2048_* metric functions reset the dataset's xflip to False, whatever
# calc_metrics_for_dataset.py's --mirror says: the official numbers were computed without mirror.
PROTOCOLS = {p.name: p for p in (
    NamedProtocol("stylegan_v", "StyleGAN-V's fvd2048_16f / fvd2048_128f, every knob from config.eval"),
    NamedProtocol("official", "tools/eval_metrics_ucf101.sh and eval_metrics_taichi.sh: generation, "
                  "fvd2048_16f, train frames, --subsample_factor 3 for UCF101 and Taichi",
                  tasks=("generate",), num_frames=16, mirror=False,
                  subsample_factor={"ffs": 1, "sky": 1, "ucf101": 3, "taichi": 3}),
    NamedProtocol("latte", "Latte's maintainers: as 'official', Taichi at subsample factor 6",
                  tasks=("generate",), num_frames=16, mirror=False,
                  subsample_factor={"ffs": 1, "sky": 1, "ucf101": 3, "taichi": 6}),
    NamedProtocol("official_long", "sample/sample_video_long.py without ground truth: 128 frames "
                  "generated from noise, 16-frame chunks overlapping by 8, fvd2048_128f",
                  tasks=("generate", "extend"), task="extend", from_noise=True, num_frames=128,
                  subsample_factor=1, mirror=False, sample=(("total_frames", 128), ("overlap", 8))),
    NamedProtocol("official_zero_shot", "tools/eval_metrics_zeroshot.sh: i2v / interpolation "
                  "against the ground-truth clips of the sample script, --subsample_factor 1",
                  tasks=("i2v", "interpolate"), num_frames=16, subsample_factor=1, mirror=False,
                  clips="sample_script",
                  frame_interval={"ffs": 2, "sky": 2, "taichi": 2, "ucf101": 3}),
)}
PROTOCOL_NAMES = tuple(PROTOCOLS)


def resolve_protocol(config):
    """(config with the eval / sample values that eval.protocol fixes, the NamedProtocol).
    Each value it changes is logged once; a task the protocol does not score is a ConfigError."""
    name = config.eval.get("protocol") or "stylegan_v"
    if name not in PROTOCOLS:
        raise ConfigError(f"eval.protocol={name!r} is unknown; use one of {', '.join(PROTOCOL_NAMES)}")
    named = PROTOCOLS[name]
    task = config.eval.task
    if named.tasks is not None and task not in named.tasks:
        raise ConfigError(f"eval.protocol={name} scores eval.task in {named.tasks}, not {task!r} "
                          f"({named.origin}); change eval.task or eval.protocol")
    dataset = config.data.get("dataset")
    fixed = {"task": named.task, "num_frames": named.num_frames, "mirror": named.mirror,
             "subsample_factor": named.value(named.subsample_factor, dataset, "eval.subsample_factor"),
             "real_selection": "first" if name != "stylegan_v" else None}
    resolved = config.copy_and_resolve_references()
    changed = []
    with resolved.unlocked():
        for section, values in (("eval", fixed), ("sample", dict(named.sample))):
            for key, value in values.items():
                if value is not None and resolved[section][key] != value:
                    changed.append(f"{section}.{key}={value!r} (was {resolved[section][key]!r})")
                    resolved[section][key] = value
    if changed:
        logger.info("eval.protocol=%s (%s) sets %s", name, named.origin, ", ".join(changed))
    return resolved, named


def protocol_from_config(config, num_frames: int, resolution: int, num_videos: int | None = None,
                         named: NamedProtocol | None = None) -> Protocol:
    """The real-clip protocol of config.eval for clips of `num_frames` at `resolution`; `named`
    (from resolve_protocol) chooses the real clips (None: StyleGAN-V's)."""
    ev = config.eval
    clips, interval = "stylegan_v", 0
    if named is not None and named.clips != "stylegan_v":
        clips = named.clips
        interval = int(named.value(named.frame_interval, config.data.get("dataset"), "the clips' frame_interval"))
    return Protocol(num_videos=int(num_videos or ev.num_videos), num_frames=num_frames,
                    subsample_factor=int(ev.subsample_factor), mirror=bool(ev.mirror),
                    selection=str(ev.real_selection), resolution=int(resolution), seed=int(ev.seed),
                    clips=clips, frame_interval=interval)


# Hex characters of the key's SHA-256 in a cache file name (80 bits: no collision in practice).
CACHE_DIGEST_CHARS = 20


def real_cache_path(cache_dir: str, real, protocol: Protocol, detector) -> tuple[str, dict]:
    """The cache file of these real statistics and the key it is named after (StyleGAN-V clips
    keep the key they had before other clip kinds existed)."""
    fields = dataclasses.asdict(protocol)
    if protocol.clips == "stylegan_v":
        fields = {k: v for k, v in fields.items() if k not in ("clips", "frame_interval")}
    key = {"version": PROTOCOL_VERSION, "detector": detector.name, "real": real.identity(),
           "count": len(real), **fields}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:CACHE_DIGEST_CHARS]
    name = f"real_fvd{len(real)}_{protocol.num_frames}f_{digest}.npz"
    return os.path.join(cache_dir, name), key


def load_cached(path: str) -> FeatureStats | None:
    return FeatureStats.load(path) if os.path.isfile(path) else None


def save_cached(path: str, key: dict, stats: FeatureStats) -> None:
    """Written by process 0 only, atomically."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with files.atomic_path(path) as temporary:
        stats.save(temporary)
    files.write_json(path[:-4] + ".json", key)


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


def check_generated_frames(frames: int, num_frames: int, where: str) -> None:
    if frames < num_frames:
        raise ConfigError(f"{where} makes videos of {frames} frames; FVD here needs eval.num_frames={num_frames}"
                         f" (set eval.num_frames <= {frames}, at least {I3D_MIN_FRAMES})")


def sampler_inputs(real_videos: np.ndarray, height: int, width: int) -> np.ndarray:
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
                       keep_count: int = 0, task: str = "generate") -> FeatureStats:
    """Statistics of `num_videos` videos of `task` sampled from noise ('generate'; 'extend' with no
    context: a long video), `per_call` at a time (sample.batch_size) with keys
    fold_in(key(seed), k); labels as the sampler draws them (uniform classes for class-conditional
    models). params: None = the sampler's own. keep: receives the first `keep_count` uint8 videos."""
    key, stats, done = jax.random.key(seed), None, 0
    bar = files.progress(num_videos, f"{task} features")
    for k in range(math.ceil(num_videos / per_call)):
        extra = {} if params is None else {"params": params}
        videos = np.asarray(sampler.run(task, jax.random.fold_in(key, k), batch_size=per_call, **extra))
        check_generated_frames(videos.shape[1], num_frames, "the sampler")
        take = min(per_call, num_videos - done)
        quantized = to_uint8(videos[:take, :num_frames])
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
    mode = tasks.get_task(task).evaluation
    if mode not in ("window", "context"):
        raise ConfigError(f"eval.task={task} is not a zero-shot task of the evaluation; use one of "
                         f"{[n for n, t in tasks.TASKS.items() if t.evaluation in ('window', 'context')]}")
    if mode == "window" and frames != num_frames:
        raise ConfigError(f"eval.task={task} conditions the model's {frames}-frame window on real "
                         f"clips; set eval.num_frames={frames}")
    context = tasks.get_task(task).overlap(frames, config.sample.overlap) if mode == "context" else frames
    per_call = int(config.sample.batch_size)
    key, fake_stats, new_real = jax.random.key(int(ev.seed)), None, None
    bar = files.progress(len(real), f"{task} features")
    with ThreadPoolExecutor(max(1, int(ev.num_workers))) as pool:
        for k, start in enumerate(range(0, len(real), per_call)):
            rows = list(range(start, min(start + per_call, len(real))))
            loaded = list(pool.map(real.read, rows + [rows[-1]] * (per_call - len(rows))))
            real_videos = np.stack([video for video, _ in loaded])
            labels = np.asarray([label for _, label in loaded], np.int32)
            inputs = sampler_inputs(real_videos[:, :context], height, width)
            videos = np.asarray(sampler.run(task, jax.random.fold_in(key, k), inputs=inputs,
                                            labels=labels if conditional else None, batch_size=per_call))
            check_generated_frames(videos.shape[1], num_frames, f"eval.task={task}")
            quantized = to_uint8(videos[: len(rows), :num_frames])
            _keep(keep, quantized, keep_count)
            fake_stats = batch_features(detector, quantized, batch_size, fake_stats)
            if real_stats is None:
                new_real = batch_features(detector, real_videos[: len(rows)], batch_size, new_real)
            if bar is not None:
                bar.update(len(rows))
    if bar is not None:
        bar.close()
    return fake_stats, real_stats if real_stats is not None else new_real


def task_features(config, sampler, detector, batch: int, real, real_stats, task: str,
                  num_videos: int, num_frames: int, seed: int, keep: list | None = None,
                  conditional: bool = False):
    """Detector statistics of one task's videos (their first `num_frames` frames): 'generate'
    samples `num_videos` from noise (keys from `seed`); the zero-shot tasks (i2v, interpolate,
    extend) condition on the clips of the real set `real`, whose statistics `real_stats` are
    already known (and on their classes when `conditional`). keep: receives the first
    sample.train_num_videos uint8 videos (the contact sheets)."""
    keep_count = int(config.sample.train_num_videos)
    if tasks.get_task(task).evaluation == "none":
        return generated_features(sampler, num_videos, num_frames, detector, batch, seed,
                                  int(config.sample.batch_size), keep=keep, keep_count=keep_count)
    task_config = config.copy_and_resolve_references()
    with task_config.unlocked():
        task_config.eval.task = task
        task_config.eval.seed = seed
    stats, _ = zero_shot_features(task_config, sampler, real, num_frames, detector, batch,
                                  real_stats, conditional=conditional, keep=keep,
                                  keep_count=keep_count)
    return stats
