"""The Stable Diffusion KL-f8 autoencoder (diffusers' `AutoencoderKL`) in linen, channels-last.

The architecture is that of stabilityai/sd-vae-ft-ema and sd-vae-ft-mse: block_out_channels
(128, 256, 512, 512), 2 resnets per encoder block (3 per decoder block), GroupNorm(32, eps 1e-6),
SiLU, one single-head attention in each mid block, 4 latent channels, 1x1 quant_conv /
post_quant_conv, scaling factor 0.18215. Smaller configs (for tests) are the same code.

Parameter names follow diffusers' module names (`down_blocks_0/resnets_1/conv1` for
`down_blocks.0.resnets.1.conv1`), so `fvdm_jax.convert.diffusers_vae` maps them mechanically.
The VAE is frozen in this project: its parameters carry no logical axis names and are replicated;
shard the batch (frames are folded into it) instead.

Pixels are in [-1, 1], (N, H, W, 3). Latents are (N, H/f, W/f, latent_channels) with
f = 2 ** (len(block_out_channels) - 1). `encode_video` / `decode_video` apply the scale factor; the
module's own `encode` / `decode` work on unscaled latents, as diffusers' do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from fvdm_jax.models.layers import ATTENTION_IMPLEMENTATIONS, dot_product_attention

Dtype = Any

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)
GROUPNORM_EPS = 1e-6
# diffusers config.json keys that do not change the network (tiling size, pipeline hints).
IGNORED_CONFIG_KEYS = (
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "sample_size",
    "force_upcast",
)
# Per-channel latent statistics some pipelines normalize with; only None is supported here.
UNSUPPORTED_IF_SET = ("latents_mean", "latents_std")
# Widest attention head the fused cuDNN kernel takes; the VAE's single head is wider (512).
CUDNN_MAX_HEAD_DIM = 128


def _group_norm(groups: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance, as torch computes it: E[x^2] - E[x]^2 cancels badly when |mean| >> std.
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=GROUPNORM_EPS,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


# torch's default Conv2d/Linear init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)). Only used
# when the VAE is not loaded from a checkpoint (tests, shape inference).
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _conv(features: int, kernel: int, dtype, param_dtype, name, stride=1, padding=None) -> nn.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2  # torch's padding=k//2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        kernel_init=TORCH_DEFAULT_INIT,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding: (N, H, W, Cin) -> (N, H, W, Cout)."""

    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _group_norm(self.groups, name="norm1", **kw)(x)
        h = _conv(self.out_channels, 3, name="conv1", **kw)(nn.silu(h))
        h = _group_norm(self.groups, name="norm2", **kw)(h)
        h = _conv(self.out_channels, 3, name="conv2", **kw)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return x + h


class MidAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a GroupNorm and a residual."""

    groups: int
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        _, height, width, channels = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _group_norm(self.groups, name="group_norm", **kw)(x)
        h = einops.rearrange(h, "n h w c -> n (h w) c")
        dense = dict(kernel_init=TORCH_DEFAULT_INIT, **kw)
        q, k, v = (nn.Dense(channels, name=name, **dense)(h) for name in ("to_q", "to_k", "to_v"))
        # One head of width C: (N, S, C) -> (N, S, 1, C), scale 1/sqrt(C) as in diffusers.
        q, k, v = (t[:, :, None, :] for t in (q, k, v))
        implementation = self.attention
        if implementation == "auto" and channels > CUDNN_MAX_HEAD_DIM:
            implementation = "xla"
        h = dot_product_attention(q, k, v, implementation)[:, :, 0, :]
        h = nn.Dense(channels, name="to_out", **dense)(h)
        h = einops.rearrange(h, "n (h w) c -> n h w c", h=height, w=width)
        return x + h


class MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution, width unchanged."""

    groups: int
    add_attention: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        x = ResnetBlock(channels, self.groups, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = MidAttention(self.groups, self.attention, name="attentions_0", **kw)(x)
        return ResnetBlock(channels, self.groups, name="resnets_1", **kw)(x)


class Resample(nn.Module):
    """diffusers' Downsample2D / Upsample2D with a conv: (N, H, W, C) -> (N, H/2, W/2, C) or
    (N, 2H, 2W, C)."""

    out_channels: int
    direction: str  # 'down' | 'up'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        if self.direction == "down":
            # torch pads right/bottom by one, then a VALID stride-2 3x3 conv.
            return _conv(self.out_channels, 3, stride=2, padding=((0, 1), (0, 1)), **kw)(x)
        x = einops.repeat(x, "n h w c -> n (h a) (w b) c", a=2, b=2)  # nearest 2x
        return _conv(self.out_channels, 3, **kw)(x)


class DownBlock(nn.Module):
    """diffusers' DownEncoderBlock2D: resnets, then (unless last) a stride-2 conv: H, W halve."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            x = Resample(self.out_channels, "down", name="downsamplers_0", **kw)(x)
        return x


class UpBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: resnets, then (unless last) nearest 2x upsampling and a conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = Resample(self.out_channels, "up", name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Pixels (N, H, W, Cin) -> moments before quant_conv (N, H/f, W/f, 2 * latent_channels)."""

    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = self.norm_num_groups
        h = _conv(self.block_out_channels[0], 3, name="conv_in", **kw)(x.astype(self.dtype))
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            h = DownBlock(
                channels,
                self.layers_per_block,
                groups,
                add_downsample=i != last,
                name=f"down_blocks_{i}",
                **kw,
            )(h)
        h = MidBlock(groups, self.mid_block_add_attention, self.attention, name="mid_block", **kw)(
            h
        )
        h = nn.silu(_group_norm(groups, name="conv_norm_out", **kw)(h))
        return _conv(2 * self.latent_channels, 3, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latents after post_quant_conv (N, h, w, latent_channels) -> pixels (N, h*f, w*f, Cout)."""

    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = self.norm_num_groups
        widths = tuple(reversed(self.block_out_channels))
        h = _conv(widths[0], 3, name="conv_in", **kw)(z.astype(self.dtype))
        h = MidBlock(groups, self.mid_block_add_attention, self.attention, name="mid_block", **kw)(
            h
        )
        last = len(widths) - 1
        for i, channels in enumerate(widths):
            h = UpBlock(
                channels,
                self.layers_per_block + 1,
                groups,
                add_upsample=i != last,
                name=f"up_blocks_{i}",
                **kw,
            )(h)
        h = nn.silu(_group_norm(groups, name="conv_norm_out", **kw)(h))
        return _conv(self.out_channels, 3, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL: `encode(x) -> (mean, logvar)`, `decode(z) -> x`.

    Fields mirror diffusers' config.json (see `vae_from_config`). `dtype` is the compute dtype,
    `param_dtype` the parameters'; `encode` returns float32 moments and `decode` float32 pixels
    whatever the compute dtype. `attention` is passed to `layers.dot_product_attention` ('auto'
    falls back to 'xla' for heads wider than cuDNN takes, as the SD VAE's 512-wide head is).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {tuple(self.block_out_channels)} are not all divisible by "
                f"norm_num_groups={self.norm_num_groups}; fix the VAE config"
            )
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"vae attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
            )
        shared = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            attention=self.attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **shared)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_quant_conv:
            self.quant_conv = _conv(2 * self.latent_channels, 1, name="quant_conv", **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = _conv(self.latent_channels, 1, name="post_quant_conv", **kw)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along H and W (8 for the SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Pixels (N, H, W, Cin) in [-1, 1] -> posterior mean and log-variance, each
        (N, H/f, W/f, latent_channels) float32 and unscaled; logvar clipped to [-30, 20]."""
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jnp.ndarray) -> jnp.ndarray:
        """Unscaled latents (N, h, w, latent_channels) -> pixels (N, h*f, w*f, Cout), float32."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Reconstruction through the posterior mean (also what `init` traces)."""
        mean, _ = self.encode(x)
        return self.decode(mean)


def vae_from_config(config: Mapping[str, Any], **overrides) -> AutoencoderKL:
    """Builds the module from a diffusers AutoencoderKL config.json dict.

    Keys that do not change the network (sample_size, force_upcast, ...) are ignored; block types
    and activations other than the KL autoencoder's are rejected. `overrides` sets module fields
    (dtype, param_dtype, attention) or replaces config values.
    """
    config = dict(config)
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"config _class_name={class_name!r}: only AutoencoderKL is supported")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"VAE act_fn={config['act_fn']!r}: only 'silu' is supported")
    block_out_channels = tuple(config.get("block_out_channels", (64,)))
    for key, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = tuple(config.get(key, (block,) * len(block_out_channels)))
        if types != (block,) * len(block_out_channels):
            raise ValueError(
                f"VAE {key}={types}: expected {len(block_out_channels)} x {block!r} "
                f"(one per block_out_channels entry)"
            )
    for key in UNSUPPORTED_IF_SET:
        if config.get(key) is not None:
            raise ValueError(f"VAE {key} is set: per-channel latent normalization is not supported")
    fields = {f.name for f in dataclasses.fields(AutoencoderKL)}
    known = fields | set(IGNORED_CONFIG_KEYS) | set(UNSUPPORTED_IF_SET)
    known |= {"act_fn", "down_block_types", "up_block_types"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"VAE config has keys this port does not know: {unknown}")
    # diffusers' own defaults for keys a config.json leaves out.
    kwargs = dict(
        block_out_channels=(64,), layers_per_block=1, norm_num_groups=32, latent_channels=4
    )
    kwargs.update({k: v for k, v in config.items() if k in fields})
    kwargs.update(overrides)
    kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return AutoencoderKL(**kwargs)


def _variables(params) -> dict:
    return params if "params" in params else {"params": params}


def latents_from_posterior(
    vae: AutoencoderKL,
    mean: jnp.ndarray,
    logvar: jnp.ndarray,
    *,
    sample: bool = False,
    rng: jax.Array | None = None,
) -> jnp.ndarray:
    """Posterior moments (..., C) -> scaled latents (z - shift_factor) * scaling_factor.

    z = mean, or with sample=True z = mean + exp(logvar / 2) * jax.random.normal(rng, mean.shape).
    """
    z = mean
    if sample:
        if rng is None:
            raise ValueError("sampling the posterior (sample=True) needs rng=jax.random.key(...)")
        z = z + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    if vae.shift_factor is not None:
        z = z - vae.shift_factor
    return z * vae.scaling_factor


def encode_video(
    vae: AutoencoderKL,
    params,
    video: jnp.ndarray,
    *,
    sample: bool = False,
    rng: jax.Array | None = None,
) -> jnp.ndarray:
    """Pixels (B, F, H, W, Cin) in [-1, 1] -> scaled latents (B, F, H/f, W/f, C), float32.

    Frames are folded into the batch for the network. latents = (z - shift_factor) *
    scaling_factor with z = mean, or with sample=True z = mean + exp(logvar / 2) *
    jax.random.normal(rng, (B, F, H/f, W/f, C)). `params` is the variables dict {'params': ...}
    or the bare parameter tree.
    """
    b, f = video.shape[:2]
    frames = einops.rearrange(video, "b f h w c -> (b f) h w c")
    mean, logvar = vae.apply(_variables(params), frames, method=AutoencoderKL.encode)
    mean, logvar = (
        einops.rearrange(t, "(b f) h w c -> b f h w c", b=b, f=f) for t in (mean, logvar)
    )
    return latents_from_posterior(vae, mean, logvar, sample=sample, rng=rng)


def decode_video(vae: AutoencoderKL, params, latents: jnp.ndarray) -> jnp.ndarray:
    """Scaled latents (B, F, h, w, C) -> pixels (B, F, h*f, w*f, Cout), float32, about [-1, 1].

    Undoes `encode_video`'s scaling (z = latents / scaling_factor + shift_factor) and decodes all
    frames as one batch.
    """
    b, f = latents.shape[:2]
    z = einops.rearrange(latents, "b f h w c -> (b f) h w c") / vae.scaling_factor
    if vae.shift_factor is not None:
        z = z + vae.shift_factor
    pixels = vae.apply(_variables(params), z, method=AutoencoderKL.decode)
    return einops.rearrange(pixels, "(b f) h w c -> b f h w c", b=b, f=f)
