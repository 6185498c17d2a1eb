"""The Wan 2.1 text-to-video DiT in linen, with a vectorized (per-latent-frame) timestep.

Layout is channels-last: x (B, F, H, W, C) latents, timesteps (B, F) on the 0-1000 scale ((B,)
is broadcast over F), context (B, L, text_dim) text-encoder tokens (UMT5-XXL: 4096), optional
context_mask (B, L) bool; output (B, F, H, W, out_channels) float32.

Same computation as Wan 2.1 (diffusers' WanTransformer3DModel): a (1, 2, 2) patch embedding, a
sinusoidal time embedding -> time MLP -> time projection to 6 modulation vectors, and blocks of
self-attention (q/k RMSNorm across heads, 3-D RoPE), cross-attention to the embedded text (after
an affine LayerNorm, not modulated) and a GELU(tanh) FFN, each block adding its learned
(6, D) table to the modulation; the head is a non-affine LayerNorm modulated by its (2, D) table
plus the time embedding, then a Linear back to patches. The per-frame timestep adds no
parameters: the time embedding and projection run once per frame and the frame's (6, D)
modulation is shared by its h*w tokens (diffusers' per-token timestep path with the frame's t
repeated). Norms, the time embedding and the modulation run in float32 as Wan does; `dtype` is
the compute dtype of the matmuls and of the token stream between blocks.

The token stream is (B, F, T, D) between blocks (T = tokens of one frame), constrained by the
logical names of layers.TOKEN_AXES; self-attention runs over all F*T tokens. Blocks are stacked
along a leading 'layers' axis and run by `nn.scan` (`scan_layers=False` unrolls it, same tree).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.models.dit import DTYPES, REMAT_POLICIES, remat_policy, resolve_remat
from fvdm_jax.models.embeddings import timestep_frequencies
from fvdm_jax.models.layers import (
    TOKEN_AXES,
    Dtype,
    Mlp,
    constrain,
    dot_product_attention,
    logical_init,
    xavier_uniform,
)
from fvdm_jax.models.lora import WAN_TARGETS, Linear, LoRA

# (dim, ffn_dim, num_heads, num_layers) of the released Wan 2.1 text-to-video models.
WAN_SIZES = {
    "1.3B": (1536, 8960, 12, 30),
    "14B": (5120, 13824, 40, 40),
}
# Logical names of the embedded text tokens (B, L, D).
TEXT_AXES = ("batch", None, "act_embed")


def wan_model_config(size: str = "1.3B", **overrides) -> dict:
    """The `model` config section of a Wan 2.1 T2V size ('1.3B', '14B', or 'tiny' for tests)."""
    if size == "tiny":
        dim, ffn, heads, layers = 24, 32, 2, 2
        base = dict(text_dim=16, freq_dim=32, in_channels=4, out_channels=4, rope_max_seq_len=32)
    elif size in WAN_SIZES:
        dim, ffn, heads, layers = WAN_SIZES[size]
        base = dict(text_dim=4096, freq_dim=256, in_channels=16, out_channels=16, rope_max_seq_len=1024)
    else:
        raise ValueError(f"Wan size {size!r} is not one of {sorted(WAN_SIZES)} or 'tiny'")
    config = dict(
        architecture="wan", dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers,
        patch_size=(1, 2, 2), eps=1e-6, qk_norm=True, cross_attn_norm=True,
        dtype="float32", param_dtype="float32", remat="none", attention="xla", scan_layers=True,
        **base,
    )
    config.update(overrides)
    return config


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head rotated by the frame / row / column position (diffusers' split)."""
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def rope_angles(head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0) -> np.ndarray:
    """(F*h*w, head_dim // 2) rotation angles of the tokens of an (F, h, w) grid, row-major.

    Each of the t / h / w parts of a head rotates its consecutive channel pairs (2i, 2i+1) by
    pos * theta^(-2i / part_dim), pos the token's frame / row / column index."""
    parts = []
    for axis, dim in enumerate(rope_split(head_dim)):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = grid[axis]
        pos = np.arange(grid[axis], dtype=np.float64).reshape(shape[:3] + [1])
        parts.append(np.broadcast_to(pos * freqs.reshape(1, 1, 1, -1), tuple(grid) + (dim // 2,)))
    return np.concatenate(parts, axis=-1).reshape(-1, head_dim // 2)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates the channel pairs of x (N, S, H, Dh) by angles given as cos/sin (S, Dh/2)."""
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class HeadRMSNorm(nn.Module):
    """RMSNorm over all heads of (..., H, Dh) (Wan's q/k norm across heads), float32 statistics."""

    eps: float
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", logical_init(nn.initializers.ones, ("heads", "kv")),
                           x.shape[-2:], self.param_dtype)
        x32 = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True)
        return (x32 * jax.lax.rsqrt(ms + self.eps) * scale.astype(jnp.float32)).astype(x.dtype)


class WanAttention(nn.Module):
    """Multi-head attention of x (N, S, D) to itself (kv=None, with RoPE) or to kv (N, L, D)."""

    dim: int
    num_heads: int
    eps: float
    qk_norm: bool
    attention: str
    dtype: Dtype
    param_dtype: Dtype
    lora: LoRA = LoRA()

    @nn.compact
    def __call__(self, x, kv=None, rope=None, mask=None):
        head_dim = self.dim // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(name, inputs):
            if self.lora.on(f"{self.name}.{name}"):
                return Linear((self.num_heads, head_dim), ("embed",), ("heads", "kv"),
                              xavier_uniform(), self.lora, name=name, **kw)(inputs)
            return nn.DenseGeneral(
                features=(self.num_heads, head_dim),
                kernel_init=logical_init(xavier_uniform(), ("embed", "heads", "kv")),
                bias_init=logical_init(nn.initializers.zeros, ("heads", "kv")),
                name=name, **kw,
            )(inputs)

        source = x if kv is None else kv
        q, k, v = proj("q", x), proj("k", source), proj("v", source)  # (N, S|L, H, Dh)
        if self.qk_norm:
            q = HeadRMSNorm(self.eps, self.param_dtype, name="norm_q")(q)
            k = HeadRMSNorm(self.eps, self.param_dtype, name="norm_k")(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (a.astype(self.dtype) for a in (q, k, v))
        # mask (N, L): padded text tokens are not attended to
        out = dot_product_attention(q, k, v, self.attention, key_mask=mask)
        if self.lora.on(f"{self.name}.o"):
            return Linear((self.dim,), ("heads", "kv"), ("embed",), xavier_uniform(), self.lora,
                          name="o", **kw)(out)
        return nn.DenseGeneral(
            features=self.dim,
            axis=(-2, -1),
            kernel_init=logical_init(xavier_uniform(), ("heads", "kv", "embed")),
            bias_init=logical_init(nn.initializers.zeros, ("embed",)),
            name="o", **kw,
        )(out)


def _norm(x, eps, name=None, affine=False, param_dtype=jnp.float32):
    """LayerNorm in float32 (Wan's FP32LayerNorm); affine parameters only for the cross norm."""
    return nn.LayerNorm(
        epsilon=eps, use_bias=affine, use_scale=affine, use_fast_variance=False,
        dtype=jnp.float32, param_dtype=param_dtype,
        scale_init=logical_init(nn.initializers.ones, ("embed",)),
        bias_init=logical_init(nn.initializers.zeros, ("embed",)),
        name=name,
    )(x.astype(jnp.float32))


class WanFFN(nn.Module):
    """layers.Mlp's fc1 -> GELU(tanh) -> fc2 (same names and init) with LoRA on its targets."""

    ffn_dim: int
    lora: LoRA
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        d, kw = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        off = LoRA()

        def lora(name):
            return self.lora if self.lora.on(f"ffn.{name}") else off

        h = Linear((self.ffn_dim,), ("embed",), ("mlp",), xavier_uniform(), lora("fc1"),
                   name="fc1", **kw)(x)
        h = nn.gelu(h, approximate=True)
        return Linear((d,), ("mlp",), ("embed",), xavier_uniform(), lora("fc2"), name="fc2",
                      **kw)(h)


class WanBlock(nn.Module):
    """One Wan block on x (B, F, T, D); mod (B, F, 6, D) float32 is the frame's time projection."""

    dim: int
    ffn_dim: int
    num_heads: int
    eps: float
    qk_norm: bool
    cross_attn_norm: bool
    attention: str
    dtype: Dtype
    param_dtype: Dtype
    lora: LoRA = LoRA()

    @nn.compact
    def __call__(self, x, context, mod, rope, mask):
        b, f, t, d = x.shape
        table = self.param("modulation", logical_init(
            lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / d**0.5, (None, "embed")),
            (6, d), self.param_dtype)
        e = (table.astype(jnp.float32)[None, None] + mod)[:, :, None]  # (B, F, 1, 6, D)
        shift, scale, gate, c_shift, c_scale, c_gate = (e[..., i, :] for i in range(6))
        attn = lambda name: WanAttention(  # noqa: E731
            d, self.num_heads, self.eps, self.qk_norm, self.attention, self.dtype,
            self.param_dtype, self.lora, name=name)

        h = (_norm(x, self.eps) * (1 + scale) + shift).astype(self.dtype)
        y = attn("self_attn")(h.reshape(b, f * t, d), rope=rope).reshape(b, f, t, d)
        x = (x.astype(jnp.float32) + y.astype(jnp.float32) * gate).astype(self.dtype)

        if self.cross_attn_norm:
            h = _norm(x, self.eps, "cross_norm", True, self.param_dtype).astype(self.dtype)
        else:
            h = x
        y = attn("cross_attn")(h.reshape(b, f * t, d), kv=context, mask=mask)
        x = x + y.reshape(b, f, t, d).astype(self.dtype)

        h = (_norm(x, self.eps) * (1 + c_scale) + c_shift).astype(self.dtype)
        if self.lora.on("ffn.fc1") or self.lora.on("ffn.fc2"):
            y = WanFFN(self.ffn_dim, self.lora, self.dtype, self.param_dtype, name="ffn")(h)
        else:
            y = Mlp(d, self.ffn_dim, self.dtype, self.param_dtype, name="ffn")(h)
        x = (x.astype(jnp.float32) + y.astype(jnp.float32) * c_gate).astype(self.dtype)
        return constrain(x, TOKEN_AXES), None


class Wan(nn.Module):
    """Wan 2.1 T2V DiT with per-frame timesteps; see the module docstring for shapes."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_max_seq_len: int = 1024
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    attention: str = "xla"
    scan_layers: bool = True
    lora: LoRA = LoRA()  # adapters (models/lora.py) on lora.targets when lora.rank > 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def _check(self, x, timesteps, context, context_mask):
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ValueError(f"model.dim={self.dim} must be model.num_heads={self.num_heads} "
                             f"times an even head width")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} is not one of {REMAT_POLICIES}")
        pt, ph, pw = self.patch_size
        if pt != 1:
            raise ValueError(f"model.patch_size={tuple(self.patch_size)}: per-frame timesteps need "
                             f"a temporal patch of 1 (Wan 2.1 uses (1, 2, 2))")
        if x.ndim != 5 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, F, H, W, C) with "
                             f"C = model.in_channels = {self.in_channels}")
        b, f, h, w, _ = x.shape
        if h % ph or w % pw:
            raise ValueError(f"latent size H x W = {h} x {w} is not divisible by the patch "
                             f"{ph} x {pw}")
        grid = (f, h // ph, w // pw)
        if max(grid) > self.rope_max_seq_len:
            raise ValueError(f"token grid {grid} exceeds model.rope_max_seq_len="
                             f"{self.rope_max_seq_len} positions along an axis")
        if tuple(timesteps.shape) not in ((b,), (b, f)):
            raise ValueError(f"timesteps have shape {tuple(timesteps.shape)}; expected (B, F) = "
                             f"{(b, f)} (one per latent frame) or (B,) = ({b},)")
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != self.text_dim:
            raise ValueError(f"context has shape {tuple(context.shape)}; expected (B, L, "
                             f"text_dim) with B = {b}, text_dim = model.text_dim = {self.text_dim}")
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"context_mask has shape {tuple(context_mask.shape)}; expected (B, L)"
                             f" = {tuple(context.shape[:2])}")
        return grid

    @nn.compact
    def __call__(self, x, timesteps, context, context_mask=None):
        """x (B, F, H, W, C), timesteps (B, F) or (B,), context (B, L, text_dim), context_mask
        (B, L) bool or None (attend to every text token, as Wan does) -> (B, F, H, W, C_out)."""
        f, gh, gw = self._check(x, timesteps, context, context_mask)
        _, ph, pw = self.patch_size
        d = self.dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda features, names, name, **extra: nn.Dense(  # noqa: E731
            features,
            kernel_init=logical_init(xavier_uniform(), names),
            bias_init=logical_init(nn.initializers.zeros, names[-1:]),
            name=name, **(kw | extra))

        tokens = einops.rearrange(x.astype(self.dtype), "b f (h p) (w q) c -> b f (h w) (p q c)",
                                  p=ph, q=pw)
        x = constrain(dense(d, ("patch", "embed"), "patch_embed")(tokens), TOKEN_AXES)

        # Time embedding per frame, in float32 (B, F, D); the projection to 6 vectors per frame.
        t = jnp.broadcast_to(timesteps.reshape(timesteps.shape[0], -1), x.shape[:2])
        freqs = timestep_frequencies(t, self.freq_dim)
        temb = dense(d, ("freq", "embed"), "time_fc1", dtype=jnp.float32)(freqs)
        temb = dense(d, ("embed_in", "embed"), "time_fc2", dtype=jnp.float32)(nn.silu(temb))
        mod = dense(6 * d, ("embed", "mlp"), "time_proj", dtype=jnp.float32)(nn.silu(temb))
        mod = mod.reshape(mod.shape[:-1] + (6, d))

        # Text: Linear, GELU(tanh), Linear; the text-dim input side takes the unsharded 'embed_in'.
        ctx = dense(d, ("embed_in", "embed"), "text_fc1")(context.astype(self.dtype))
        ctx = dense(d, ("embed_in", "embed"), "text_fc2")(nn.gelu(ctx, approximate=True))
        ctx = constrain(ctx, TEXT_AXES)

        angles = rope_angles(self.head_dim, (f, gh, gw))
        rope = (jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32))
        mask = None if context_mask is None else context_mask.astype(bool)

        block = WanBlock
        remat = resolve_remat(self.remat)
        if remat != "none":
            block = nn.remat(block, policy=remat_policy(remat), prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 4,
            length=self.num_layers,
            unroll=1 if self.scan_layers else self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = blocks(d, self.ffn_dim, self.num_heads, self.eps, self.qk_norm,
                      self.cross_attn_norm, self.attention, lora=self.lora, name="blocks", **kw)(
            x, ctx, mod, rope, mask)
        x = constrain(x, TOKEN_AXES)

        table = self.param("head_modulation", logical_init(
            lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / d**0.5, (None, "embed")),
            (2, d), self.param_dtype)
        e = (table.astype(jnp.float32)[None, None] + temb[:, :, None])[:, :, None]  # (B,F,1,2,D)
        x = (_norm(x, self.eps) * (1 + e[..., 1, :]) + e[..., 0, :]).astype(self.dtype)
        x = nn.Dense(
            ph * pw * self.out_channels,
            kernel_init=logical_init(nn.initializers.zeros, ("embed", "patch")),
            bias_init=logical_init(nn.initializers.zeros, ("patch",)),
            name="head", **kw,
        )(x)
        x = einops.rearrange(x, "b f (h w) (p q c) -> b f (h p) (w q) c", h=gh, p=ph, q=pw)
        return x.astype(jnp.float32)


def _qk_norm(value) -> bool:
    if value in (True, "rms_norm_across_heads"):
        return True
    if value in (False, None, "none"):
        return False
    raise ValueError(f"model.qk_norm={value!r}: Wan supports True ('rms_norm_across_heads') or "
                     f"False")


def wan_from_config(model_config: Mapping[str, Any]) -> Wan:
    """Builds the Wan model from a `model` config section (architecture='wan')."""
    if model_config.get("image_dim") is not None or model_config.get("added_kv_proj_dim"):
        raise ValueError("model.image_dim / added_kv_proj_dim are set: that is a Wan image-to-video"
                         " model; only text-to-video (no image embedder) is implemented")
    for key in ("dtype", "param_dtype"):
        if model_config.get(key, "float32") not in DTYPES:
            raise ValueError(f"model.{key}={model_config[key]!r} is not one of {list(DTYPES)}")
    required = ("dim", "ffn_dim", "num_heads", "num_layers")
    missing = [k for k in required if model_config.get(k) is None]
    if missing:
        raise ValueError(f"the Wan model config lacks {missing} (see wan_model_config)")
    patch = tuple(int(p) for p in model_config.get("patch_size", (1, 2, 2)))
    if len(patch) != 3:
        raise ValueError(f"model.patch_size={patch} must be (t, h, w)")
    in_channels = int(model_config.get("in_channels", 16))
    return Wan(
        dim=int(model_config["dim"]),
        ffn_dim=int(model_config["ffn_dim"]),
        num_heads=int(model_config["num_heads"]),
        num_layers=int(model_config["num_layers"]),
        freq_dim=int(model_config.get("freq_dim", 256)),
        text_dim=int(model_config.get("text_dim", 4096)),
        in_channels=in_channels,
        out_channels=int(model_config.get("out_channels") or in_channels),
        patch_size=patch,
        eps=float(model_config.get("eps", 1e-6)),
        qk_norm=_qk_norm(model_config.get("qk_norm", True)),
        cross_attn_norm=bool(model_config.get("cross_attn_norm", True)),
        rope_max_seq_len=int(model_config.get("rope_max_seq_len", 1024)),
        dtype=DTYPES[model_config.get("dtype", "float32")],
        param_dtype=DTYPES[model_config.get("param_dtype", "float32")],
        remat=str(model_config.get("remat", "none")),
        attention=str(model_config.get("attention", "xla")),
        scan_layers=bool(model_config.get("scan_layers", True)),
        lora=LoRA(rank=int(model_config.get("lora_rank") or 0),
                  alpha=model_config.get("lora_alpha"),
                  targets=tuple(model_config.get("lora_targets") or WAN_TARGETS)),
    )
