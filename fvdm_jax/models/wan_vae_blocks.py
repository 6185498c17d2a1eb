"""The layers of Wan 2.1's causal 3-D video VAE (diffusers' `AutoencoderKLWan`) in linen,
channels-last: (B, T, H, W, C).

Every 3-D convolution is causal in time: a frame sees itself and the frames before it, never the
ones after. The video is processed as a stream of chunks (the encoder: the first frame alone, then
4 frames at a time; the decoder: one latent frame at a time); each causal convolution keeps the
last frames of its input stream in the 'cache' collection (zeros before the first chunk) and
prepends them to the next chunk, so the chunked result equals the one diffusers computes with its
feat_cache. The temporal resamplers treat the first chunk specially, as diffusers does:
`downsample3d` passes the first frame through (then a stride-2 time convolution over the cached
last frame and the new ones), `upsample3d` does not double the first frame (and its time
convolution sees zeros in its place). `fvdm_jax.models.wan_vae` drives the chunks.

Parameter names follow diffusers' module names (`down_blocks_2/resample_1` for
`down_blocks.2.resample.1`), so `fvdm_jax.convert.wan_vae` maps them mechanically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fvdm_jax.models.layers import dot_product_attention
from fvdm_jax.models.vae import CUDNN_MAX_HEAD_DIM, TORCH_DEFAULT_INIT

Dtype = Any

# Frames of its input stream a 3x3x3 causal convolution keeps (diffusers' CACHE_T).
CACHE_T = 2
RMS_EPS = 1e-12  # torch's F.normalize clamps the norm to at least this
RESAMPLE_MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")


def stream(module: nn.Module, name: str, x: jnp.ndarray, keep: int) -> jnp.ndarray:
    """cat(cached frames, x) along time; caches the last `keep` frames of it for the next chunk.

    The cache variable starts as `keep` zero frames, which is the causal zero padding of the
    first chunk."""
    b, _, h, w, c = x.shape
    cache = module.variable("cache", name, jnp.zeros, (b, keep, h, w, c), x.dtype)
    full = jnp.concatenate([cache.value, x], axis=1)
    cache.value = full[:, -keep:]
    return full


def _conv(features, kernel, name, dtype, param_dtype, stride=None, padding=None) -> nn.Conv:
    """A torch-style convolution; `padding` defaults to k//2 on the spatial axes and none in time
    (a 3-D kernel's past frames come from `stream`)."""
    if padding is None:
        pads = [(k // 2, k // 2) for k in kernel]
        if len(kernel) == 3:
            pads[0] = (0, 0)
        padding = tuple(pads)
    return nn.Conv(
        features,
        tuple(kernel),
        strides=tuple(stride) if stride else None,
        padding=padding,
        kernel_init=TORCH_DEFAULT_INIT,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class RMSNorm(nn.Module):
    """diffusers' WanRMS_norm: x / max(|x|_2, 1e-12) * sqrt(C) * gamma over the channel axis
    (computed in float32, returned in `dtype`). Wan 2.1 uses it without a bias."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (channels,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, RMS_EPS) * (channels**0.5) * gamma.astype(jnp.float32)
        return y.astype(self.dtype)


class ResidualBlock(nn.Module):
    """WanResidualBlock: RMS norm, SiLU, causal 3x3x3 conv, twice, plus a 1x1x1 shortcut when the
    width changes: (B, T, H, W, Cin) -> (B, T, H, W, out_dim)."""

    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = x
        if x.shape[-1] != self.out_dim:
            shortcut = _conv(self.out_dim, (1, 1, 1), "conv_shortcut", **kw)(x)
        h = nn.silu(RMSNorm(name="norm1", **kw)(x))
        h = _conv(self.out_dim, (3, 3, 3), "conv1", **kw)(stream(self, "conv1_past", h, CACHE_T))
        h = nn.silu(RMSNorm(name="norm2", **kw)(h))
        h = _conv(self.out_dim, (3, 3, 3), "conv2", **kw)(stream(self, "conv2_past", h, CACHE_T))
        return h + shortcut


class AttentionBlock(nn.Module):
    """WanAttentionBlock: single-head self-attention over the H*W positions of each frame
    (no mixing across frames), RMS norm in front, residual around."""

    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, height, width, c = x.shape
        h = RMSNorm(name="norm", **kw)(x).reshape(b * t, height, width, c)
        qkv = _conv(3 * c, (1, 1), "to_qkv", **kw)(h).reshape(b * t, height * width, 3 * c)
        q, k, v = (a[:, :, None, :] for a in jnp.split(qkv, 3, axis=-1))  # one head of width C
        implementation = self.attention
        if implementation == "auto" and c > CUDNN_MAX_HEAD_DIM:
            implementation = "xla"
        h = dot_product_attention(q, k, v, implementation)[:, :, 0, :]
        h = _conv(c, (1, 1), "proj", **kw)(h.reshape(b * t, height, width, c))
        return x + h.reshape(b, t, height, width, c)


class MidBlock(nn.Module):
    """WanMidBlock: resnet -> attention -> resnet, width unchanged."""

    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResidualBlock(c, name="resnets_0", **kw)(x)
        x = AttentionBlock(self.attention, name="attentions_0", **kw)(x)
        return ResidualBlock(c, name="resnets_1", **kw)(x)


class Resample(nn.Module):
    """WanResample. downsample2d: zero pad right/bottom, 3x3 stride-2 conv (H, W halve).
    downsample3d: the same, then (after the first chunk) a (3, 1, 1) stride-2 time conv over the
    previous chunk's last frame and this chunk's frames (T halves). upsample2d: nearest 2x, 3x3
    conv to C/2. upsample3d: first (after the first chunk) a causal (3, 1, 1) time conv to 2C
    whose halves become two frames each (T doubles), then as upsample2d."""

    mode: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, h, w, c = x.shape
        if self.mode == "upsample3d":
            if first:  # the cache stays zeros: the first frame is not doubled nor seen
                self.variable("cache", "time_past", jnp.zeros, (b, CACHE_T, h, w, c), x.dtype)
            else:
                x = _conv(2 * c, (3, 1, 1), "time_conv", **kw)(stream(self, "time_past", x, CACHE_T))
                # Channels [:C] are the earlier frame of each pair, [C:] the later one.
                x = x.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact 2x
            return _conv(c // 2, (3, 3), "resample_1", **kw)(x)
        x = _conv(c, (3, 3), "resample_1", stride=(2, 2), padding=((0, 1), (0, 1)), **kw)(x)
        if self.mode == "downsample3d":
            if first:  # the first frame passes; it is the next chunk's past frame
                cache = self.variable("cache", "time_past", jnp.zeros, (b, 1) + x.shape[2:], x.dtype)
                cache.value = x[:, -1:]
            else:
                x = stream(self, "time_past", x, 1)
                x = _conv(c, (3, 1, 1), "time_conv", stride=(2, 1, 1), **kw)(x)
        return x


class UpBlock(nn.Module):
    """WanUpBlock: num_res_blocks + 1 resnets to out_dim, then (optionally) one resampler."""

    out_dim: int
    num_res_blocks: int
    upsample_mode: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.out_dim, name=f"resnets_{j}", **kw)(x)
        if self.upsample_mode is not None:
            x = Resample(self.upsample_mode, name="upsamplers_0", **kw)(x, first)
        return x


class Encoder3d(nn.Module):
    """WanEncoder3d on one chunk: pixels (B, t, H, W, Cin) -> (B, t', H/f, W/f, out_dim).

    `down_blocks` is diffusers' flat list: per level num_res_blocks resnets, then (but for the
    last level) a resampler, so `down_blocks_{i}` counts across levels."""

    dim: int = 96
    out_dim: int = 32
    dim_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: Sequence[bool] = (False, True, True)
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, first: bool) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dims = [self.dim * u for u in (1, *self.dim_mult)]
        x = _conv(dims[0], (3, 3, 3), "conv_in", **kw)(stream(self, "conv_in_past", x, CACHE_T))
        index, last = 0, len(self.dim_mult) - 1
        for i, width in enumerate(dims[1:]):
            for _ in range(self.num_res_blocks):
                x = ResidualBlock(width, name=f"down_blocks_{index}", **kw)(x)
                index += 1
            if i != last:
                mode = "downsample3d" if self.temperal_downsample[i] else "downsample2d"
                x = Resample(mode, name=f"down_blocks_{index}", **kw)(x, first)
                index += 1
        x = MidBlock(self.attention, name="mid_block", **kw)(x)
        x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
        return _conv(self.out_dim, (3, 3, 3), "conv_out", **kw)(
            stream(self, "conv_out_past", x, CACHE_T)
        )


class Decoder3d(nn.Module):
    """WanDecoder3d on one chunk: latents (B, t, h, w, z_dim) -> pixels (B, t', h*f, w*f, Cout).

    Widths run dim * (dim_mult[-1], reversed dim_mult); each resampler halves the width, so every
    up block after the first starts at half the previous level's width (Wan 2.1)."""

    dim: int = 96
    out_channels: int = 3
    dim_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_upsample: Sequence[bool] = (True, True, False)
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray, first: bool) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mult = tuple(self.dim_mult)
        dims = [self.dim * u for u in (mult[-1], *mult[::-1])]
        x = _conv(dims[0], (3, 3, 3), "conv_in", **kw)(stream(self, "conv_in_past", z, CACHE_T))
        x = MidBlock(self.attention, name="mid_block", **kw)(x)
        last = len(mult) - 1
        for i, width in enumerate(dims[1:]):
            mode = None
            if i != last:
                mode = "upsample3d" if self.temperal_upsample[i] else "upsample2d"
            x = UpBlock(width, self.num_res_blocks, mode, name=f"up_blocks_{i}", **kw)(x, first)
        x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
        return _conv(self.out_channels, (3, 3, 3), "conv_out", **kw)(
            stream(self, "conv_out_past", x, CACHE_T)
        )
