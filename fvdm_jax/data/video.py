"""Video decoding to uint8 numpy arrays: video files through PyAV, frame folders through PIL.

numpy, PyAV and PIL only (never jax): this runs inside grain worker processes. PyAV is imported
lazily, so importing this module works without it; the first decode raises a one-line error
saying how to install it.

Frame numbering. Frame `i` of a video file is the i-th frame the decoder outputs (presentation
order), as `torchvision.io.read_video` (the official loaders) counts them. Frame `i` of a frame
folder is its i-th image file in natural order (digit runs compare as numbers, so `img_2.jpg`
precedes `img_10.jpg`; for zero-padded names this is the plain sorted order).

Reading a few frames (`read_frames(path, indices)`) decodes from the start up to the last wanted
frame and converts only the wanted ones to RGB. For a constant-frame-rate file with a wanted
frame at least `seek_min_frame` deep, it first seeks to the keyframe before it; the frame numbers
after the seek come from presentation timestamps and are verified (integral, consecutive) or the
read falls back to decoding from the start, so both paths return the same frames.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from fvdm_jax.errors import ConfigError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Seek only when the first wanted frame is at least this deep: below it, decoding from the start
# costs about as much as the keyframe seek and the extra timestamp checks.
DEFAULT_SEEK_MIN_FRAME = 48


class VideoReadError(RuntimeError):
    """A video file or frame folder could not be read (corrupt, empty, or not a video)."""


class ShortVideoError(VideoReadError):
    """Fewer frames decoded than a wanted index needs; `num_frames` is how many there were."""

    def __init__(self, path, num_frames: int, wanted: int):
        super().__init__(
            f"{path}: decoded only {num_frames} frames, frame {wanted} was wanted."
        )
        self.num_frames = num_frames


def _av():
    """The PyAV module, or a one-line error saying how to install it."""
    try:
        import av  # noqa: PLC0415 (lazy: keeps this module importable without PyAV)
    except ImportError as error:
        raise ImportError(
            "decoding video files needs PyAV: pip install av==18.1.0"
        ) from error
    return av


def natural_sort_key(name: str) -> list:
    """Sort key comparing digit runs as numbers: 'f2' < 'f10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def is_video_file(path: str | os.PathLike) -> bool:
    """Whether `path` has a video file extension (case-insensitive)."""
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether `path` has a frame image extension (jpg/jpeg/png, case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside `folder` (hidden files skipped), in natural order."""
    with os.scandir(folder) as entries:
        names = [
            entry.name
            for entry in entries
            if not entry.name.startswith(".") and is_image_file(entry.name) and entry.is_file()
        ]
    folder = Path(folder)
    return [folder / name for name in sorted(names, key=natural_sort_key)]


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames of a video file or frame folder, without decoding where possible.

    A folder: its number of image files. A video file: the container's frame count
    (`nb_frames`, exact for mp4/mov/avi); else the number of video packets, found by demuxing
    without decoding (one packet per frame for h264/vp8/vp9/mpeg4/mjpeg/ffv1); else a full decode.

    Raises:
      VideoReadError: the path cannot be opened, has no video stream, or has no frames.
    """
    path = Path(path)
    if path.is_dir():
        count = len(list_frame_files(path))
        if count == 0:
            raise VideoReadError(f"{path}: a folder without jpg/png frames.")
        return count
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream.")
            stream = container.streams.video[0]
            count = int(stream.frames or 0)
            if count <= 0:
                count = sum(1 for packet in container.demux(stream) if packet.size > 0)
        if count <= 0:
            with av.open(str(path)) as container:
                count = sum(1 for _ in container.decode(container.streams.video[0]))
    except VideoReadError:
        raise
    except Exception as error:  # PyAV raises many types (FFmpegError, OSError, ValueError).
        raise VideoReadError(f"{path}: {type(error).__name__}: {error}") from error
    if count <= 0:
        raise VideoReadError(f"{path}: no decodable frames.")
    return count


def _read_image(path: Path) -> np.ndarray:
    """One image file as uint8 (H, W, 3)."""
    from PIL import Image  # noqa: PLC0415 (lazy: PIL is only needed for frame folders)

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _stack(frames: list[np.ndarray], path) -> np.ndarray:
    """Frames of one video as (T, H, W, 3), or a VideoReadError if their sizes differ."""
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise VideoReadError(f"{path}: frames of different sizes {sorted(shapes)}.")
    return np.stack(frames)


def _read_folder_frames(folder: Path, indices: np.ndarray | None) -> np.ndarray:
    files = list_frame_files(folder)
    if not files:
        raise VideoReadError(f"{folder}: a folder without jpg/png frames.")
    if indices is None:
        indices = np.arange(len(files))
    if len(indices) and indices.max() >= len(files):
        raise ShortVideoError(folder, len(files), int(indices.max()))
    cache: dict[int, np.ndarray] = {}
    try:
        for index in np.unique(indices):
            cache[int(index)] = _read_image(files[index])
    except Exception as error:
        raise VideoReadError(f"{folder}: {type(error).__name__}: {error}") from error
    return _stack([cache[int(index)] for index in indices], folder)


def _decode_sequential(container, stream, wanted: set[int], last: int):
    """Frames `wanted` (display indices) decoding from the start, stopping after frame `last`.

    Returns ({index: uint8 (H, W, 3)}, number of frames decoded).
    """
    frames = {}
    decoded = 0
    for index, frame in enumerate(container.decode(stream)):
        decoded = index + 1
        if index in wanted:
            frames[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            break
    return frames, decoded


def _constant_rate(stream) -> Fraction | None:
    """Frames per second when the stream looks constant-rate (count matches duration), else None."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate or not stream.frames or not stream.duration or not stream.time_base:
        return None
    expected = Fraction(stream.duration) * stream.time_base * rate
    return Fraction(rate) if abs(expected - stream.frames) <= 1 else None


def _decode_after_seek(container, stream, wanted: set[int], first: int, last: int):
    """Frames `wanted` via a keyframe seek, or None when the timestamps cannot be trusted."""
    rate = _constant_rate(stream)
    if rate is None:
        return None
    # The first frame's timestamp anchors the numbering (it can differ from stream.start_time).
    first_frame = next(container.decode(stream), None)
    if first_frame is None or first_frame.pts is None:
        return None
    origin = first_frame.pts
    ticks_per_frame = 1 / (rate * stream.time_base)  # Fraction: pts ticks per frame
    container.seek(int(origin + first * ticks_per_frame), backward=True, stream=stream)
    frames = {}
    previous = None
    for frame in container.decode(stream):
        if frame.pts is None:
            return None
        position = (frame.pts - origin) / ticks_per_frame
        index = round(position)
        # Verify the numbering: integral and consecutive, starting at or before `first`.
        if abs(position - index) > Fraction(1, 10):
            return None
        if previous is None and index > first:
            return None
        if previous is not None and index != previous + 1:
            return None
        previous = index
        if index in wanted:
            frames[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            break
    return frames


def _video_stream(container, path, threads: int):
    """The first video stream of an open container (decode threads set), or VideoReadError."""
    if not container.streams.video:
        raise VideoReadError(f"{path}: no video stream.")
    stream = container.streams.video[0]
    if threads > 0:
        stream.codec_context.thread_count = threads
    return stream


def _read_video_file_frames(
    path: Path, indices: np.ndarray | None, *, seek_min_frame: int | None, threads: int
) -> np.ndarray:
    av = _av()
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path, threads)
            if indices is None:
                frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
                if not frames:
                    raise VideoReadError(f"{path}: no decodable frames.")
                return _stack(frames, path)
            wanted = {int(index) for index in indices}
            first, last = min(wanted), max(wanted)
            decoded = None
            if seek_min_frame is not None and first >= seek_min_frame:
                decoded = _decode_after_seek(container, stream, wanted, first, last)
                if decoded is not None and last not in decoded:
                    decoded = None  # ran out of frames after the seek: count them from the start
                if decoded is None:
                    container.seek(0, backward=True, any_frame=False)
            if decoded is None:
                decoded, total = _decode_sequential(container, stream, wanted, last)
                if last not in decoded:
                    raise ShortVideoError(path, total, last)
    except VideoReadError:
        raise
    except Exception as error:  # PyAV raises many types (FFmpegError, OSError, ValueError).
        raise VideoReadError(f"{path}: {type(error).__name__}: {error}") from error
    return _stack([decoded[int(index)] for index in indices], path)


def read_frames(
    path: str | os.PathLike,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    seek_min_frame: int | None = DEFAULT_SEEK_MIN_FRAME,
    threads: int = 0,
) -> np.ndarray:
    """Frames `indices` (all when None) of a video file or frame folder: uint8 (T, H, W, 3).

    Args:
      path: a video file (mp4/avi/webm/mkv/mov/...) or a folder of jpg/png frames.
      indices: frame numbers to return, in this order (repeats allowed); None reads every frame.
      seek_min_frame: seek to a keyframe when the first wanted frame is at least this deep
        (constant-rate files only, verified; see the module docstring); None never seeks.
      threads: decoder threads for video files; 0 keeps FFmpeg's default.

    Raises:
      ShortVideoError: a wanted index is beyond the last frame (`.num_frames` says how many).
      VideoReadError: anything else that stops the read (corrupt file, mixed frame sizes).
    """
    path = Path(path)
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and indices.min() < 0:
            raise ConfigError(f"frame indices must be >= 0, got {indices.min()}.")
        if len(indices) == 0:
            raise ConfigError("read_frames got an empty list of frame indices.")
    if path.is_dir():
        return _read_folder_frames(path, indices)
    return _read_video_file_frames(path, indices, seek_min_frame=seek_min_frame, threads=threads)


def read_video(path: str | os.PathLike, *, threads: int = 0) -> np.ndarray:
    """Every frame of a video file or frame folder: uint8 (T, H, W, 3)."""
    return read_frames(path, None, threads=threads)


def iter_frames(path: str | os.PathLike, *, threads: int = 0) -> Iterator[np.ndarray]:
    """Every frame of a video file or frame folder, one uint8 (H, W, 3) at a time.

    For long or large videos that should not sit in memory whole (e.g. to downscale each frame
    as it is decoded). Raises VideoReadError as `read_frames` does.
    """
    path = Path(path)
    if path.is_dir():
        files = list_frame_files(path)
        if not files:
            raise VideoReadError(f"{path}: a folder without jpg/png frames.")
        for file in files:
            try:
                image = _read_image(file)
            except Exception as error:
                raise VideoReadError(f"{file}: {type(error).__name__}: {error}") from error
            yield image
        return
    av = _av()
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path, threads)
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
    except VideoReadError:
        raise
    except Exception as error:  # PyAV raises many types (FFmpegError, OSError, ValueError).
        raise VideoReadError(f"{path}: {type(error).__name__}: {error}") from error
