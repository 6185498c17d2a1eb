"""Per-dataset clip sampling and augmentation, as the official FVDM/Latte loaders do it.

Pure numpy with an explicit `np.random.Generator` (never jax, never the global RNG): this runs
inside grain worker processes, and every draw must be a function of the example's seed.

Temporal sampling (Latte's TemporalRandomCrop), window = num_frames * frame_interval:
  begin ~ uniform integer in [0, max(0, total - window - 1)] (both ends included),
  end = min(begin + window, total), so a short video gives a shorter window (and, as in the
  official code, a video longer than the window never uses its last frame).
Frames from the window, per dataset:
  ffs, ucf101: np.linspace(begin, end - 1, num_frames, dtype=int) (evenly spaced, truncated)
  sky, taichi: frames begin, begin + frame_interval, ... < end (the stride slice
               window[0:window:frame_interval]), the first num_frames of them.
Spatial, per dataset (flip, when drawn, comes first, as in the official transform order):
  ffs, ucf101: random horizontal flip (p = 0.5); short side resized to image_size, then a
               center crop to image_size x image_size.
  sky:         no flip; center crop to the short side's square, then resized to image_size.
  taichi:      random horizontal flip; frames already image_size x image_size pass unchanged,
               other sizes get the ffs/ucf101 short-side resize and center crop (the official
               code does nothing: its frames are 256 x 256).
Resizing is bilinear with half-pixel centers and no antialiasing, exactly
`torch.nn.functional.interpolate(mode='bilinear', align_corners=False)` as the official code
calls it (the short-side resize maps coordinates with the scale image_size / short side, as
`scale_factor=` does). `antialias=True` switches to the triangle filter that widens with the
downscale factor (PIL's / torch's antialiased bilinear), better when shrinking a lot.
Crop offsets are `int(round((size - crop) / 2))` (Python rounding), as the official center crop.

Minimum video length (a shorter video is skipped when the source is indexed, never read):
  ffs, ucf101: num_frames (the official code asserts it).
  sky:         window + 1 (the official Sky loader drops videos of window frames or fewer).
  taichi:      (num_frames - 1) * frame_interval + 1, the fewest frames whose stride slice still
               holds num_frames frames (the official code has no rule and would fail to batch).
With these minimums every rule yields exactly num_frames frames, so a long run never crashes.

Output: float32 (F, S, S, 3) in [-1, 1], pixel = value / 127.5 - 1 (the official ToTensor then
Normalize(0.5, 0.5)).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from fvdm_jax.errors import ConfigError

DATASETS = ("ffs", "ucf101", "sky", "taichi")


@dataclasses.dataclass(frozen=True)
class ClipRule:
    """How one dataset turns a video into a clip.

    frames: 'linspace' (evenly spaced over the window) or 'stride' (every frame_interval-th).
    flip: whether a random horizontal flip (p = 0.5) is drawn.
    spatial: 'short_side_crop' (resize the short side, center crop), 'square_crop_resize'
      (center crop to a square, resize) or 'resize_if_needed' (taichi, see the module docstring).
    """

    frames: str
    flip: bool
    spatial: str


CLIP_RULES = {
    "ffs": ClipRule(frames="linspace", flip=True, spatial="short_side_crop"),
    "ucf101": ClipRule(frames="linspace", flip=True, spatial="short_side_crop"),
    "sky": ClipRule(frames="stride", flip=False, spatial="square_crop_resize"),
    "taichi": ClipRule(frames="stride", flip=True, spatial="resize_if_needed"),
}


class ClipPlan(NamedTuple):
    """The random choices for one clip: frame indices (F,) into the video, and the flip."""

    indices: np.ndarray
    flip: bool


def clip_rule(dataset: str) -> ClipRule:
    """The rule of `dataset`, or a one-line error listing the known names."""
    rule = CLIP_RULES.get(dataset)
    if rule is None:
        raise ConfigError(f"dataset={dataset!r} is unknown; use one of {', '.join(DATASETS)}.")
    return rule


def _check_clip_args(num_frames: int, frame_interval: int) -> None:
    if num_frames <= 0 or frame_interval <= 0:
        raise ConfigError(
            f"num_frames={num_frames} and frame_interval={frame_interval} must be positive."
        )


def min_video_frames(dataset: str, num_frames: int, frame_interval: int) -> int:
    """Fewest frames a video needs to be used by `dataset` (see the module docstring)."""
    _check_clip_args(num_frames, frame_interval)
    rule = clip_rule(dataset)
    if dataset == "sky":
        return num_frames * frame_interval + 1
    if rule.frames == "stride":
        return (num_frames - 1) * frame_interval + 1
    return num_frames


def temporal_window(total_frames: int, window: int, rng: np.random.Generator) -> tuple[int, int]:
    """Latte's TemporalRandomCrop: (begin, end); begin uniform in [0, max(0, total-window-1)]."""
    last_begin = max(0, total_frames - window - 1)
    begin = int(rng.integers(0, last_begin + 1))
    return begin, min(begin + window, total_frames)


def clip_frame_indices(
    dataset: str,
    total_frames: int,
    num_frames: int,
    frame_interval: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """The num_frames frame indices of one random clip: int64 (F,), each in [0, total_frames).

    Raises ValueError when the video is shorter than `min_video_frames` (callers skip those).
    """
    needed = min_video_frames(dataset, num_frames, frame_interval)
    if total_frames < needed:
        raise ConfigError(
            f"a {dataset} clip of {num_frames} frames at interval {frame_interval} needs a video "
            f"of at least {needed} frames, got {total_frames}; skip such videos."
        )
    begin, end = temporal_window(total_frames, num_frames * frame_interval, rng)
    if clip_rule(dataset).frames == "linspace":
        return np.linspace(begin, end - 1, num_frames, dtype=int).astype(np.int64)
    return np.arange(begin, end, frame_interval, dtype=np.int64)[:num_frames]


def sample_clip(
    dataset: str,
    total_frames: int,
    num_frames: int,
    frame_interval: int,
    rng: np.random.Generator,
) -> ClipPlan:
    """All random choices of one clip, drawn in a fixed order: the window, then the flip."""
    indices = clip_frame_indices(dataset, total_frames, num_frames, frame_interval, rng)
    flip = bool(rng.random() < 0.5) if clip_rule(dataset).flip else False
    return ClipPlan(indices=indices, flip=flip)


# ----------------------------------------------------------------------------------------------
# Resizing: separable taps (source indices and weights per output pixel) for each axis.


def _bilinear_taps(in_size: int, out_size: int, inverse_scale: float):
    """torch bilinear, align_corners=False, no antialias: 2 taps per output pixel."""
    source = (np.arange(out_size, dtype=np.float64) + 0.5) * inverse_scale - 0.5
    source = np.maximum(source, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low
    indices = np.stack([low, high], axis=1)
    weights = np.stack([1.0 - frac, frac], axis=1)
    return indices, weights


def _antialias_taps(in_size: int, out_size: int, inverse_scale: float):
    """Triangle filter widened by the downscale factor (PIL / torch antialias=True)."""
    support = max(inverse_scale, 1.0)
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * inverse_scale
    starts = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    stops = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    num_taps = int((stops - starts).max())
    indices = starts[:, None] + np.arange(num_taps)[None, :]
    weights = np.maximum(0.0, 1.0 - np.abs((indices - centers[:, None] + 0.5) / support))
    weights[indices >= stops[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    return np.minimum(indices, in_size - 1), weights


def _resize_taps(in_size, out_size, inverse_scale, antialias):
    if antialias and inverse_scale > 1.0:
        return _antialias_taps(in_size, out_size, inverse_scale)
    return _bilinear_taps(in_size, out_size, inverse_scale)


def _apply_taps(x: np.ndarray, axis: int, indices: np.ndarray, weights: np.ndarray):
    """sum_k weights[:, k] * x[indices[:, k]] along `axis`, in float32."""
    shape = [1] * x.ndim
    shape[axis] = -1
    weights = weights.astype(np.float32)
    out = np.take(x, indices[:, 0], axis=axis).astype(np.float32)
    out *= weights[:, 0].reshape(shape)
    for k in range(1, indices.shape[1]):
        term = np.take(x, indices[:, k], axis=axis).astype(np.float32, copy=False)
        term *= weights[:, k].reshape(shape)
        out += term
    return out


def resize_frames(
    frames: np.ndarray,
    out_height: int,
    out_width: int,
    *,
    crop: tuple[int, int, int, int] | None = None,
    scale: tuple[float, float] | None = None,
    antialias: bool = False,
) -> np.ndarray:
    """Resize (..., H, W, C) frames to (out_height, out_width), then optionally crop: float32.

    Args:
      frames: (..., H, W, C), any real dtype (uint8 stays in [0, 255]).
      out_height, out_width: size of the resized image before the crop.
      crop: (top, left, height, width) of the part of the resized image to return; computing
        only those rows and columns gives exactly the crop of the full resize, for less work.
      scale: (row, column) scale factors that map coordinates, as torch's `scale_factor=`;
        None uses out / in.
      antialias: False is torch bilinear (align_corners=False, no antialias); True widens the
        filter when shrinking (PIL / torch antialias=True).

    Returns:
      float32 (..., height, width, C) with values in the input's range.
    """
    in_height, in_width = frames.shape[-3], frames.shape[-2]
    top, left, height, width = crop if crop is not None else (0, 0, out_height, out_width)
    if top < 0 or left < 0 or top + height > out_height or left + width > out_width:
        raise ConfigError(
            f"crop {crop} does not fit in the resized {out_height}x{out_width} image."
        )
    row_scale, column_scale = scale if scale is not None else (None, None)
    x = frames
    for axis, in_size, out_size, axis_scale, start, size in (
        (frames.ndim - 3, in_height, out_height, row_scale, top, height),
        (frames.ndim - 2, in_width, out_width, column_scale, left, width),
    ):
        if out_size == in_size and axis_scale in (None, 1.0):
            x = np.take(x, np.arange(start, start + size), axis=axis)
            continue
        inverse = 1.0 / axis_scale if axis_scale else in_size / out_size
        indices, weights = _resize_taps(in_size, out_size, inverse, antialias)
        x = _apply_taps(x, axis, indices[start : start + size], weights[start : start + size])
    return x.astype(np.float32, copy=False)


def center_crop_offsets(height: int, width: int, crop_height: int, crop_width: int):
    """(top, left) of the official center crop: int(round((size - crop) / 2))."""
    return int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))


def short_side_resize_crop(
    frames: np.ndarray, image_size: int, *, antialias: bool = False
) -> np.ndarray:
    """Short side resized to image_size (scale S / short side), center crop: float32 (..., S, S, C).

    The short side becomes exactly image_size (the official floor(short * scale) can lose a
    pixel to floating-point rounding); the long side is floor(long * scale).
    """
    height, width = frames.shape[-3], frames.shape[-2]
    scale = image_size / min(height, width)
    if height <= width:
        out_height, out_width = image_size, int(np.floor(width * scale + 1e-6))
    else:
        out_height, out_width = int(np.floor(height * scale + 1e-6)), image_size
    top, left = center_crop_offsets(out_height, out_width, image_size, image_size)
    return resize_frames(
        frames,
        out_height,
        out_width,
        crop=(top, left, image_size, image_size),
        scale=(scale, scale),
        antialias=antialias,
    )


def cover_resize_crop(
    frames: np.ndarray, height: int, width: int, *, antialias: bool = True
) -> np.ndarray:
    """Resized (one scale for both axes) just enough to cover height x width, then the center
    cropped: float32 (..., height, width, C). A square target is `short_side_resize_crop`'s; the
    Wan encoders use it for their (8h, 8w) pixel windows."""
    if height <= 0 or width <= 0:
        raise ConfigError(f"resize target {height}x{width} must be positive.")
    in_height, in_width = frames.shape[-3], frames.shape[-2]
    if (in_height, in_width) == (height, width):
        return np.asarray(frames, np.float32)
    scale = max(height / in_height, width / in_width)
    out_height = max(height, int(np.floor(in_height * scale + 1e-6)))
    out_width = max(width, int(np.floor(in_width * scale + 1e-6)))
    top, left = center_crop_offsets(out_height, out_width, height, width)
    return resize_frames(frames, out_height, out_width, crop=(top, left, height, width),
                         scale=(scale, scale), antialias=antialias)


def square_crop_resize(frames: np.ndarray, image_size: int, *, antialias: bool = False):
    """Center crop to the short side's square, then resize to image_size: float32 (..., S, S, C)."""
    height, width = frames.shape[-3], frames.shape[-2]
    side = min(height, width)
    top, left = center_crop_offsets(height, width, side, side)
    square = frames[..., top : top + side, left : left + side, :]
    return resize_frames(square, image_size, image_size, antialias=antialias)


def to_signed_unit(frames: np.ndarray) -> np.ndarray:
    """Pixels in [0, 255] to float32 in [-1, 1] (value / 127.5 - 1), clipped against rounding."""
    return np.clip(np.asarray(frames, np.float32) / np.float32(127.5) - 1.0, -1.0, 1.0)


def augment_frames(
    frames: np.ndarray,
    dataset: str,
    image_size: int,
    flip: bool,
    *,
    antialias: bool = False,
) -> np.ndarray:
    """`dataset`'s spatial rule: uint8 (F, H, W, 3) -> float32 (F, S, S, 3) in [-1, 1].

    Flip first, then resize/crop, as the official transform order (with an odd margin the
    center crop of a flipped frame is not the flip of the center crop).
    """
    rule = clip_rule(dataset)
    if image_size <= 0:
        raise ConfigError(f"image_size={image_size} must be positive.")
    if flip:
        frames = frames[..., :, ::-1, :]
    height, width = frames.shape[-3], frames.shape[-2]
    if rule.spatial == "square_crop_resize":
        frames = square_crop_resize(frames, image_size, antialias=antialias)
    elif rule.spatial == "short_side_crop" or (height, width) != (image_size, image_size):
        frames = short_side_resize_crop(frames, image_size, antialias=antialias)
    return to_signed_unit(frames)
