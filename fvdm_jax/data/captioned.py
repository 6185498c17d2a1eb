"""A folder of captioned videos (what Wan's --mode=encode reads): the videos, their captions and
one clip of frames per video at the model's pixel size.

Videos are `folder.find_videos`'s: every video file (mp4 / avi / webm / mkv / mov / ...) and every
folder of jpg / png frames anywhere under the root, in natural order of the relative path.
A video's caption is, first found:

1. `<video>.txt` beside it, the video's name with its extension replaced (`clips/cat.mp4` ->
   `clips/cat.txt`; a frame folder `clips/cat/` -> `clips/cat.txt`): the whole file, stripped;
2. the row of `metadata.csv` at the root (DiffSynth-Studio's layout: a header with the columns
   `file_name` and `text`, file_name the path relative to the root, '/'-separated).

A video with neither, or an empty caption, is a one-line ConfigError naming it (the job stops
before it encodes anything). The clip of a video: frames 0, s, 2s, ... (s = the frame
interval), as many as asked (Wan: 1 + 4k), resized to cover H x W (antialiased) and
center-cropped, as float32 in [-1, 1].

numpy, PyAV and PIL only (never jax).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import numpy as np

from fvdm_jax.data.clips import cover_resize_crop, to_signed_unit
from fvdm_jax.data.folder import find_videos
from fvdm_jax.data.video import is_video_file, read_frames
from fvdm_jax.errors import ConfigError

CAPTION_SUFFIX = ".txt"
METADATA_FILE = "metadata.csv"
METADATA_COLUMNS = ("file_name", "text")


@dataclasses.dataclass(frozen=True)
class CaptionedVideo:
    path: str  # the video file or frame folder
    relative_path: str  # relative to the root, '/'-separated
    caption: str


def caption_file(video: str | os.PathLike) -> Path:
    """`<video>.txt` beside the video (its extension replaced; a frame folder's name + .txt)."""
    video = Path(video)
    stem = video.with_suffix("") if is_video_file(video) else video
    return stem.with_name(stem.name + CAPTION_SUFFIX)


def read_metadata(root: str | os.PathLike) -> dict[str, str]:
    """{relative path: caption} of root/metadata.csv ({} when there is none)."""
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in METADATA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path} lacks the column(s) {', '.join(missing)}: its header must "
                              f"name {', '.join(METADATA_COLUMNS)} (file_name relative to "
                              f"{root})")
        return {row["file_name"].strip().replace("\\", "/").removeprefix("./"): (row["text"] or "")
                for row in reader if row.get("file_name")}


def captioned_videos(root: str | os.PathLike) -> list[CaptionedVideo]:
    """Every video under `root` with its caption (see the module doc); ConfigError (one line)
    for a missing folder, no videos, or a video without a caption."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data.path={root} is not a folder of videos")
    videos = find_videos(root)
    if not videos:
        raise ConfigError(f"data.path={root} holds no videos (mp4 / avi / webm / mkv / mov / ... "
                          f"or folders of jpg / png frames)")
    metadata = read_metadata(root)
    found = []
    for video in videos:
        relative = video.relative_to(root).as_posix()
        sidecar = caption_file(video)
        if sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
        else:
            caption = (metadata.get(relative) or "").strip()
        if not caption:
            where = f"{sidecar} is empty" if sidecar.is_file() else f"no {sidecar.name} beside it"
            raise ConfigError(
                f"video {relative} has no caption ({where}, and {root / METADATA_FILE} has no "
                f"non-empty row for it): write its caption to {sidecar} or add a row "
                f"'{relative},<caption>' to {METADATA_FILE}, or move the video out of data.path")
        found.append(CaptionedVideo(str(video), relative, caption))
    return found


def read_clip(path: str, num_frames: int, frame_interval: int, height: int,
              width: int) -> np.ndarray:
    """Frames 0, s, ..., (num_frames - 1) s of a video (s = frame_interval), resized to cover
    height x width (antialiased, rounded to whole pixel values) and center-cropped: float32
    (num_frames, height, width, 3) in [-1, 1]. ShortVideoError when the video is too short."""
    indices = np.arange(int(num_frames)) * int(frame_interval)
    frames = read_frames(path, indices)
    resized = cover_resize_crop(frames.astype(np.float32), int(height), int(width))
    return to_signed_unit(np.round(resized))
