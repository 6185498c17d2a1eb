"""Video files in and out: uint8 quantization, MP4 / GIF writers, PNG contact sheets, and the
image / video inputs of the sampling job.

Quantization is StyleGAN-V's (what its FVD sees of saved frames): uint8((x * 127.5 + 128) clipped to
[0, 255]), so a frame that came from uint8 pixels u as u / 127.5 - 1 quantizes back to exactly u.
Writers are atomic (a temporary name, then a rename): an interrupted job never leaves a truncated
file under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fvdm_jax.data.clips import cover_resize_crop, short_side_resize_crop, to_signed_unit
from fvdm_jax.data.video import VideoReadError, is_image_file, is_video_file, read_frames
from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime import files
from fvdm_jax.runtime.files import atomic_path


def to_uint8(videos) -> np.ndarray:
    """Frames in [-1, 1] (any shape) -> uint8 with StyleGAN-V's rounding (truncation of x*127.5+128)."""
    x = np.asarray(videos, np.float32)
    return np.clip(x * np.float32(127.5) + np.float32(128.0), 0.0, 255.0).astype(np.uint8)


def to_rgb(videos) -> np.ndarray:
    """(..., C) -> (..., 3) for display: C = 3 as is, C = 1 repeated, C > 3 its first three
    channels (a pixel-space model with C != 3 has no colours of its own)."""
    videos = np.asarray(videos)
    channels = videos.shape[-1]
    if channels == 3:
        return videos
    if channels == 1:
        return np.repeat(videos, 3, axis=-1)
    if channels > 3:
        return videos[..., :3]
    return np.concatenate([videos, np.zeros_like(videos[..., :1])], axis=-1)


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ConfigError(
            f"frames of shape {frames.shape} and dtype {frames.dtype}; expected uint8 (F, H, W, 3)"
        )
    return frames


def write_mp4(path: str, frames, fps: int = 8, *, crf: int = 17) -> str:
    """uint8 (F, H, W, 3) -> an H.264 MP4 (yuv420p; odd sides are padded by one edge pixel)."""
    import av

    frames = _check_frames(frames)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with atomic_path(path) as tmp, av.open(tmp, mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(path: str, frames, fps: int = 8) -> str:
    """uint8 (F, H, W, 3) -> a looping GIF."""
    from PIL import Image

    frames = _check_frames(frames)
    images = [Image.fromarray(frame) for frame in frames]
    with atomic_path(path) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(int(round(1000 / fps)), 10),
            loop=0,
        )
    return path


def sheet_scale(height: int, min_frame_size: int) -> int:
    """The integer upscaling that shows frames of `height` pixels at >= min_frame_size pixels."""
    return max(1, -(-int(min_frame_size) // max(int(height), 1)))


def frame_grid(videos, pad: int = 1, pad_value: int = 255, scale: int = 1) -> np.ndarray:
    """uint8 (B, F, H, W, 3) -> one uint8 image (B rows of F frames) with `pad` pixels between;
    each frame enlarged `scale` times (nearest neighbour: every generated pixel stays visible)."""
    videos = np.asarray(videos)
    if videos.ndim != 5:
        raise ConfigError(f"videos of shape {videos.shape}; expected (B, F, H, W, C)")
    if int(scale) < 1:
        raise ConfigError(f"scale={scale} must be >= 1")
    if scale > 1:
        videos = videos.repeat(int(scale), axis=2).repeat(int(scale), axis=3)
    b, f, h, w, c = videos.shape
    grid = np.full((b * (h + pad) + pad, f * (w + pad) + pad, c), pad_value, videos.dtype)
    for i in range(b):
        for j in range(f):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top : top + h, left : left + w] = videos[i, j]
    return grid


def write_png(path: str, image) -> str:
    """uint8 (H, W, 3) -> PNG."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
    return path


def load_input(path: str, size: int | tuple[int, int],
               max_frames: int | None = None) -> np.ndarray:
    """An image, a video file or a frame folder -> float32 (K, size, size, 3) in [-1, 1].

    Images give K = 1; videos their first `max_frames` frames (all when None). The short side is
    resized to `size` (antialiased: inputs are usually much larger than the model) and the
    center is cropped. size (H, W): resized to cover H x W, then center-cropped to (K, H, W, 3).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"sample input {path} does not exist")
    if os.path.isdir(path) or is_video_file(path):
        try:
            frames = read_frames(path)
        except VideoReadError as error:
            raise ConfigError(f"sample input {path} cannot be decoded ({error}); give a readable "
                              f"video, image or frame folder") from None
        if max_frames is not None:
            frames = frames[:max_frames]
    elif is_image_file(path):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                frames = np.asarray(image.convert("RGB"))[None]
        except (UnidentifiedImageError, OSError) as error:
            raise ConfigError(f"sample input {path} is not a readable image ({error})") from None
    else:
        raise ConfigError(f"sample input {path} is neither an image, a video nor a frame folder")
    if isinstance(size, (tuple, list)):
        resized = cover_resize_crop(frames.astype(np.float32), int(size[0]), int(size[1]))
    else:
        resized = short_side_resize_crop(frames.astype(np.float32), size, antialias=True)
    return to_signed_unit(np.round(resized))


def load_inputs(paths: Sequence[str], size: int | tuple[int, int],
                max_frames: int | None = None) -> list[np.ndarray]:
    """`load_input` of each path: a list of float32 (K_i, size, size, 3) (or (K_i, H, W, 3))
    clips."""
    return [load_input(p, size, max_frames) for p in paths]


def write_media(directory: str, videos: np.ndarray, first_index: int, fps: int, name: str,
                sheet_frame_size: int = 1):
    """MP4 + GIF per video (video_XXXXX) and one contact sheet `name`.png whose frames are
    enlarged (nearest neighbour) to at least `sheet_frame_size` pixels."""
    for i, video in enumerate(videos):
        stem = files.join(directory, f"video_{first_index + i:05d}")
        write_mp4(stem + ".mp4", video, fps)
        write_gif(stem + ".gif", video, fps)
    scale = sheet_scale(videos.shape[2], sheet_frame_size)
    write_png(files.join(directory, f"{name}.png"), frame_grid(videos, scale=scale))
