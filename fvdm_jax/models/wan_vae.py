"""Wan 2.1's causal 3-D video VAE (diffusers' `AutoencoderKLWan`) in linen, channels-last.

The Wan 2.1 config: base_dim 96, z_dim 16, dim_mult (1, 2, 4, 4), num_res_blocks 2,
temperal_downsample (False, True, True): 8x spatial and 4x temporal compression, so a video of
1 + 4k frames (B, 1 + 4k, H, W, 3) in [-1, 1] becomes latents (B, 1 + k, H/8, W/8, 16).
The layers are in `fvdm_jax.models.wan_vae_blocks`; smaller configs (for tests) are the same code.

Encoding runs the encoder on the first frame, then on chunks of 4 frames; decoding runs the
decoder on one latent frame at a time (diffusers' chunking, which the temporal resamplers depend
on). The causal convolutions' time cache is the flax 'cache' collection, carried from chunk to
chunk by a `jax.lax.scan`: memory does not grow with the video's length and each chunk function
compiles once. The functions here are pure: jit them with the module static.

Two latent conventions: `encode_moments` / `decode_latents` work on the VAE's own latents (the
posterior mean, as `vae.encode(x).latent_dist.mean` and `vae.decode(z)` in diffusers);
`encode_video` / `decode_video` on normalised latents (mean - latents_mean) * (1 / latents_std),
per channel, which is what the Wan pipelines and the DiT use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.models.layers import ATTENTION_IMPLEMENTATIONS
from fvdm_jax.models.wan_vae_blocks import Decoder3d, Encoder3d

Dtype = Any

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)
# Frames per encoder chunk after the first frame (diffusers and the original code: 1, 4, 4, ...).
CHUNK_FRAMES = 4
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# The Wan 2.1 VAE as diffusers' config.json spells it (also diffusers' defaults).
WAN21_CONFIG = {
    "_class_name": "AutoencoderKLWan",
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": list(WAN21_LATENTS_MEAN),
    "latents_std": list(WAN21_LATENTS_STD),
}
# config.json keys that do not change the network at inference (besides every '_...' key).
IGNORED_CONFIG_KEYS = ("dropout", "scale_factor_temporal", "scale_factor_spatial")


class WanVAE(nn.Module):
    """diffusers' AutoencoderKLWan (Wan 2.1): `encode_chunk` / `decode_chunk` process one chunk and
    keep the time cache in the 'cache' collection (apply them with mutable=['cache']); use
    `encode_moments`, `decode_latents`, `encode_video`, `decode_video` for whole videos.

    Fields mirror diffusers' config.json (see `wan_vae_from_config`); `decoder_base_dim` None is
    base_dim. `dtype` is the compute dtype (the time cache is kept in it), `param_dtype` the
    parameters'; moments and pixels come out float32. latents_mean / latents_std (z_dim values
    each, or None for no normalisation) are what `encode_video` normalises with.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: Sequence[bool] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: Sequence[float] | None = WAN21_LATENTS_MEAN
    latents_std: Sequence[float] | None = WAN21_LATENTS_STD
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        check_config(self)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shared = dict(
            dim_mult=tuple(self.dim_mult),
            num_res_blocks=self.num_res_blocks,
            attention=self.attention,
            **kw,
        )
        self.encoder = Encoder3d(
            dim=self.base_dim,
            out_dim=2 * self.z_dim,
            temperal_downsample=tuple(self.temperal_downsample),
            **shared,
        )
        self.decoder = Decoder3d(
            dim=self.decoder_base_dim or self.base_dim,
            out_channels=self.out_channels,
            temperal_upsample=tuple(self.temperal_downsample)[::-1],
            **shared,
        )
        conv = dict(kernel_size=(1, 1, 1), padding="VALID", **kw)
        self.quant_conv = nn.Conv(2 * self.z_dim, **conv)
        self.post_quant_conv = nn.Conv(self.z_dim, **conv)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W (8 for Wan 2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (4 for Wan 2.1)."""
        return 2 ** sum(bool(d) for d in self.temperal_downsample)

    def encode_chunk(self, x: jnp.ndarray, first: bool) -> jnp.ndarray:
        """One encoder chunk: (B, 1, H, W, Cin) if `first`, else (B, 4, H, W, Cin) -> moments
        (B, 1 or 4 / temporal_factor, H/f, W/f, 2 * z_dim), float32, before the clamp."""
        moments = self.quant_conv(self.encoder(x.astype(self.dtype), first))
        return moments.astype(jnp.float32)

    def decode_chunk(self, z: jnp.ndarray, first: bool) -> jnp.ndarray:
        """One latent frame (B, 1, h, w, z_dim) -> pixels (B, 1 if `first` else temporal_factor,
        h*f, w*f, Cout), float32, not clamped."""
        x = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(x, first).astype(jnp.float32)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Two chunks each way on (B, 5, H, W, Cin) (what `init` traces; every parameter is used):
        returns the decoded (B, 1 + temporal_factor, H, W, Cout)."""
        moments = [self.encode_chunk(x[:, :1], True), self.encode_chunk(x[:, 1:5], False)]
        mean = jnp.split(moments[0], 2, axis=-1)[0]
        first = self.decode_chunk(mean, True)
        return jnp.concatenate([first, self.decode_chunk(mean, False)], axis=1)


def check_config(vae: WanVAE):
    """ValueError (one line) for a WanVAE whose fields do not make a Wan 2.1 VAE."""
    levels = len(vae.dim_mult)
    if levels < 1 or len(vae.temperal_downsample) != levels - 1:
        raise ValueError(
            f"Wan VAE temperal_downsample {tuple(vae.temperal_downsample)} needs one entry per "
            f"resampling level: len(dim_mult) - 1 = {levels - 1}"
        )
    if CHUNK_FRAMES % vae.temporal_factor:
        raise ValueError(
            f"Wan VAE temporal factor {vae.temporal_factor} (temperal_downsample "
            f"{tuple(vae.temperal_downsample)}) does not divide the {CHUNK_FRAMES}-frame chunks"
        )
    for name in ("latents_mean", "latents_std"):
        values = getattr(vae, name)
        if values is not None and len(values) != vae.z_dim:
            raise ValueError(f"Wan VAE {name} has {len(values)} values, z_dim is {vae.z_dim}")
    if vae.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"vae attention={vae.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")


def wan_vae_from_config(config: Mapping[str, Any], **overrides) -> WanVAE:
    """Builds the module from a diffusers AutoencoderKLWan config.json dict.

    Keys that start with '_' and those that do not change the network (dropout, scale factors)
    are ignored; keys missing take diffusers' defaults (the Wan 2.1 VAE). The Wan 2.2 features
    (is_residual, patch_size) and attention in the down blocks (attn_scales) raise ValueError.
    `overrides` sets module fields (dtype, param_dtype, attention) or replaces config values.
    """
    class_name = dict(config).get("_class_name", "AutoencoderKLWan")
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    if class_name != "AutoencoderKLWan":
        raise ValueError(f"config _class_name={class_name!r}: only AutoencoderKLWan is supported")
    if config.pop("is_residual", False):
        raise ValueError("Wan VAE is_residual=true is the Wan 2.2 VAE; only Wan 2.1 is supported")
    if config.pop("patch_size", None) is not None:
        raise ValueError("Wan VAE patch_size is set (the Wan 2.2 VAE); only Wan 2.1 is supported")
    if list(config.pop("attn_scales", None) or []):
        raise ValueError("Wan VAE attn_scales is not empty: only Wan 2.1's (none) is supported")
    fields = {f.name for f in dataclasses.fields(WanVAE)} - {"parent", "name"}
    unknown = sorted(set(config) - fields - set(IGNORED_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"Wan VAE config has keys this port does not know: {unknown}")
    kwargs = {k: v for k, v in config.items() if k in fields}
    kwargs.update(overrides)
    for key in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    if "temperal_downsample" in kwargs:
        kwargs["temperal_downsample"] = tuple(bool(d) for d in kwargs["temperal_downsample"])
    vae = WanVAE(**kwargs)
    check_config(vae)
    return vae


def check_video_shape(vae: WanVAE, shape: Sequence[int]):
    """ValueError (one line) unless `shape` is a video (B, 1 + 4k, H, W, in_channels) with H and W
    multiples of the spatial factor."""
    shape = tuple(shape)
    f = vae.spatial_factor
    if len(shape) != 5 or shape[-1] != vae.in_channels:
        raise ValueError(
            f"Wan VAE input {shape}: expected a video (B, T, H, W, {vae.in_channels}) channels-last"
        )
    if shape[1] < 1 or (shape[1] - 1) % CHUNK_FRAMES:
        raise ValueError(
            f"Wan VAE input has {shape[1]} frames: expected 1 + {CHUNK_FRAMES}k (1, 5, 9, ...)"
        )
    if shape[2] % f or shape[3] % f or not shape[2] or not shape[3]:
        raise ValueError(f"Wan VAE input is {shape[2]}x{shape[3]} pixels: H and W must be multiples of {f}")


def check_latent_shape(vae: WanVAE, shape: Sequence[int]):
    """ValueError (one line) unless `shape` is latents (B, T', h, w, z_dim)."""
    shape = tuple(shape)
    if len(shape) != 5 or shape[-1] != vae.z_dim or shape[1] < 1:
        raise ValueError(f"Wan VAE latents {shape}: expected (B, T', h, w, {vae.z_dim}), T' >= 1")


def latent_frames(vae: WanVAE, frames: int) -> int:
    """Latent frames of a 1 + 4k frame video: 1 + 4k / temporal_factor."""
    return 1 + (frames - 1) // vae.temporal_factor


def _params(params) -> dict:
    return {"params": params["params"] if "params" in params else params}


def _chunked(vae: WanVAE, params, x: jnp.ndarray, chunk: int, method) -> jnp.ndarray:
    """Runs `method` on x[:, :1] (first=True), then scans it over chunks of `chunk` frames,
    carrying the 'cache' collection; returns the outputs concatenated along time."""
    variables = _params(params)
    out, state = vae.apply(variables, x[:, :1], True, method=method, mutable=["cache"])
    rest = x.shape[1] - 1
    if not rest:
        return out
    b = x.shape[0]
    chunks = x[:, 1:].reshape(b, rest // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)

    def step(state, piece):
        y, state = vae.apply({**variables, **state}, piece, False, method=method, mutable=["cache"])
        return state, y

    _, ys = jax.lax.scan(step, state, chunks)  # (k, B, t, ...)
    ys = ys.swapaxes(0, 1).reshape(b, -1, *ys.shape[3:])
    return jnp.concatenate([out, ys], axis=1)


def encode_moments(vae: WanVAE, params, video: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pixels (B, 1 + 4k, H, W, Cin) in [-1, 1] -> posterior mean and log-variance, each
    (B, 1 + k, H/8, W/8, z_dim) float32 (diffusers' `vae.encode(x).latent_dist.mean / .logvar`:
    unnormalised, logvar clamped to [-30, 20]). `params`: {'params': ...} or the bare tree."""
    check_video_shape(vae, video.shape)
    moments = _chunked(vae, params, video, CHUNK_FRAMES, WanVAE.encode_chunk)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def decode_latents(vae: WanVAE, params, z: jnp.ndarray) -> jnp.ndarray:
    """Unnormalised latents (B, 1 + k, h, w, z_dim) -> pixels (B, 1 + 4k, 8h, 8w, Cout), float32,
    clamped to [-1, 1] (diffusers' `vae.decode(z).sample`)."""
    check_latent_shape(vae, z.shape)
    pixels = _chunked(vae, params, z, 1, WanVAE.decode_chunk)
    return jnp.clip(pixels, -1.0, 1.0)


def _stats(vae: WanVAE) -> tuple[np.ndarray, np.ndarray]:
    """(latents_mean, 1 / latents_std) as float32 arrays (zeros and ones when not set)."""
    mean = np.zeros(vae.z_dim, np.float32) if vae.latents_mean is None else vae.latents_mean
    std = np.ones(vae.z_dim, np.float32) if vae.latents_std is None else vae.latents_std
    return np.asarray(mean, np.float32), np.float32(1.0) / np.asarray(std, np.float32)


def normalize_latents(vae: WanVAE, z: jnp.ndarray) -> jnp.ndarray:
    """VAE latents (..., z_dim) -> normalised latents (z - latents_mean) * (1 / latents_std)."""
    mean, inv_std = _stats(vae)
    return (z - mean) * inv_std


def denormalize_latents(vae: WanVAE, latents: jnp.ndarray) -> jnp.ndarray:
    """Normalised latents (..., z_dim) -> VAE latents latents / (1 / latents_std) + latents_mean,
    as the Wan pipelines compute it."""
    mean, inv_std = _stats(vae)
    return latents / inv_std + mean


def encode_video(
    vae: WanVAE,
    params,
    video: jnp.ndarray,
    *,
    sample: bool = False,
    rng: jax.Array | None = None,
) -> jnp.ndarray:
    """Pixels (B, 1 + 4k, H, W, Cin) in [-1, 1] -> normalised latents (B, 1 + k, H/8, W/8, z_dim),
    float32: (z - latents_mean) * (1 / latents_std) with z the posterior mean, or with sample=True
    z = mean + exp(logvar / 2) * jax.random.normal(rng, mean.shape)."""
    mean, logvar = encode_moments(vae, params, video)
    z = mean
    if sample:
        if rng is None:
            raise ValueError("sampling the posterior (sample=True) needs rng=jax.random.key(...)")
        z = z + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return normalize_latents(vae, z)


def decode_video(vae: WanVAE, params, latents: jnp.ndarray) -> jnp.ndarray:
    """Normalised latents (B, 1 + k, h, w, z_dim) -> pixels (B, 1 + 4k, 8h, 8w, Cout), float32 in
    [-1, 1]: undoes `encode_video`'s normalisation, then `decode_latents`."""
    check_latent_shape(vae, latents.shape)
    return decode_latents(vae, params, denormalize_latents(vae, latents))


def param_shapes(vae: WanVAE) -> dict:
    """{'params': tree of ShapeDtypeStruct} of `vae`, without allocating anything."""
    f = vae.spatial_factor
    x = jax.ShapeDtypeStruct((1, 1 + CHUNK_FRAMES, f, f, vae.in_channels), jnp.float32)
    return {"params": jax.eval_shape(vae.init, jax.random.key(0), x)["params"]}


def init_params(vae: WanVAE, rng: jax.Array) -> dict:
    """Random {'params': ...} (torch's default init for the convolutions; for tests)."""
    f = vae.spatial_factor
    x = jnp.zeros((1, 1 + CHUNK_FRAMES, f, f, vae.in_channels), jnp.float32)
    return {"params": vae.init(rng, x)["params"]}
