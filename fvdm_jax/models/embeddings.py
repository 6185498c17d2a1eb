"""Fixed sin-cos tables and the per-frame timestep / class embedders of the video DiT.

The position tables follow the MAE/DiT convention that the official FVDM and Latte code uses, so
that converted checkpoints see exactly the embeddings they were trained with.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fvdm_jax.models.layers import Dtype, logical_init


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) table [sin(pos * w), cos(pos * w)], w = 10000^(-2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", np.asarray(positions, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) table for a square token grid, tokens in row-major order.

    As in MAE's reference, the first half of the channels encodes the column (w) coordinate and
    the second half the row (h) coordinate.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb_w = sincos_1d(embed_dim // 2, cols)
    emb_h = sincos_1d(embed_dim // 2, rows)
    return np.concatenate([emb_w, emb_h], axis=1)


def timestep_frequencies(timesteps: jnp.ndarray, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal features of (possibly fractional) timesteps: (...,) -> (..., dim), [cos, sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[..., None] * freqs
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[..., :1])], axis=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Per-frame timesteps (B, F) -> (B, F, D) through a 256-d sinusoid and a 2-layer SiLU MLP."""

    hidden_size: int
    frequency_dim: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timesteps: jnp.ndarray) -> jnp.ndarray:
        freqs = timestep_frequencies(timesteps, self.frequency_dim)
        dense = lambda name, axes: nn.Dense(  # noqa: E731
            self.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical_init(nn.initializers.normal(0.02), axes),
            bias_init=logical_init(nn.initializers.zeros, ("embed",)),
            name=name,
        )
        h = dense("fc1", ("freq", "embed"))(freqs)
        h = nn.silu(h)
        return dense("fc2", ("embed_in", "embed"))(h)


class LabelEmbedder(nn.Module):
    """Class ids (B,) -> (B, D). Row num_classes is the null class used by classifier-free guidance.

    The table has num_classes + 1 rows when label dropout is on (as the official model), else
    num_classes rows. Label dropout itself happens in the training step (see `drop_labels`).
    """

    num_classes: int
    hidden_size: int
    with_null_class: bool
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jnp.ndarray) -> jnp.ndarray:
        rows = self.num_classes + int(self.with_null_class)
        table = self.param(
            "embedding",
            logical_init(nn.initializers.normal(0.02), ("vocab", "embed")),
            (rows, self.hidden_size),
            self.param_dtype,
        )
        return jnp.take(table, labels, axis=0)
