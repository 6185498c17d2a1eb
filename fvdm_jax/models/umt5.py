"""The UMT5 text encoder (Wan 2.1 encodes its prompts with UMT5-XXL's encoder) in linen.

Same computation as transformers' `UMT5EncoderModel` and Wan's `T5Encoder(shared_pos=False)`:
token embedding, then `num_layers` blocks of

    x = x + SelfAttention(RMSNorm(x))     own relative position bias in every block (T5: block 0 only)
    x = x + FFN(RMSNorm(x))               gated: wo(act(wi_0 x) * wi_1 x), act = GELU(tanh) for UMT5

and a final RMS norm. T5 conventions: the norms are RMS norms with a scale and no bias or mean,
the linear layers have no biases, and attention scores are not scaled by 1/sqrt(d_kv). The position
bias is a learned (num_buckets, heads) table indexed by the bidirectional relative-position bucket
of (key - query), exact up to num_buckets / 4 and logarithmic up to max_distance. Padding keys
(mask 0) get no attention; padded query positions are computed like the others (as transformers
and Wan do: their rows are whatever attention to the real tokens gives, not zeros).

Inputs: token ids (B, L) int32 and attention mask (B, L) (1 / True = a real token); output the
last hidden states (B, L, d_model) float32. `dtype` is the compute dtype of the matmuls (bf16 for
the XXL model); norms, softmax and the residual stream stay float32.

Parameter names follow transformers' (`encoder.block.3.layer.0.SelfAttention.q.weight` is our
`encoder/block_3/layer_0/SelfAttention/q/kernel`), so fvdm_jax/convert/umt5.py maps them one to
one; q/k/v kernels are (d_model, heads, d_kv) and o is (heads, d_kv, d_model), with the logical
axis names of fvdm_jax/models/layers.py. `umt5_from_config` builds the module from a transformers
config.json dict; UMT5_XXL holds Wan's sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.models.layers import Dtype, logical_init

# transformers' config.json keys of UMT5-XXL's encoder (google/umt5-xxl; Wan's text encoder).
UMT5_XXL = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
)
REQUIRED_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
# UMT5Config's defaults of the other keys that shape the network.
CONFIG_DEFAULTS = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")
# transformers' activation names (ACT2FN) -> functions.
ACTIVATIONS = {
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Logical names of the encoder's token stream (B, L, D).
TEXT_AXES = ("batch", None, "act_embed")


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int, bidirectional: bool = True) -> np.ndarray:
    """(query_length, key_length) int32 buckets of key - query positions, as transformers'
    `UMT5Attention._relative_position_bucket` computes them (its float32 log, truncation and
    clipping, so that the buckets agree at the edges of the logarithmic bins)."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(relative.dtype) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    ratio = np.maximum(relative, 1).astype(np.float32) / np.float32(max_exact)
    log_ratio = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    buckets += np.where(is_small, relative, large)
    return buckets.astype(np.int32)


class RMSNorm(nn.Module):
    """T5's layer norm: x / sqrt(mean(x^2) + eps) * scale, in float32, no bias, no mean."""

    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", logical_init(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * scale.astype(jnp.float32)


class UMT5Attention(nn.Module):
    """Self-attention with its own relative position bias, unscaled scores, masked keys."""

    num_heads: int
    d_kv: int
    num_buckets: int
    max_distance: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        length, d_model = x.shape[1], x.shape[-1]

        def project(name):
            return nn.DenseGeneral(
                (self.num_heads, self.d_kv), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
                kernel_init=logical_init(nn.initializers.normal(d_model ** -0.5),
                                         ("embed", "heads", "kv")),
            )(x)

        q, k, v = project("q"), project("k"), project("v")  # (B, L, H, Dk)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        table = self.param(
            "relative_attention_bias",
            logical_init(nn.initializers.normal(d_model ** -0.5), (None, "heads")),
            (self.num_buckets, self.num_heads), self.param_dtype)
        buckets = relative_position_buckets(length, length, self.num_buckets, self.max_distance)
        bias = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # (L, L, H)
        scores = scores + bias.transpose(2, 0, 1)[None]
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(
            d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
            param_dtype=self.param_dtype, name="o",
            kernel_init=logical_init(nn.initializers.normal((self.num_heads * self.d_kv) ** -0.5),
                                     ("heads", "kv", "embed")),
        )(out).astype(jnp.float32)


class UMT5FeedForward(nn.Module):
    """wo(act(wi_0 x) * wi_1 x) when gated (UMT5), else wo(act(wi x))."""

    d_ff: int
    activation: str = "gelu_new"
    gated: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        d_model = x.shape[-1]
        act = ACTIVATIONS[self.activation]

        def dense(features, name, names, fan_in):
            return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=logical_init(nn.initializers.normal(fan_in ** -0.5), names),
                            name=name)

        if self.gated:
            h = act(dense(self.d_ff, "wi_0", ("embed", "mlp"), d_model)(x)) * \
                dense(self.d_ff, "wi_1", ("embed", "mlp"), d_model)(x)
        else:
            h = act(dense(self.d_ff, "wi", ("embed", "mlp"), d_model)(x))
        return dense(d_model, "wo", ("mlp", "embed"), self.d_ff)(h).astype(jnp.float32)


class UMT5LayerSelfAttention(nn.Module):
    num_heads: int
    d_kv: int
    num_buckets: int
    max_distance: int
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        h = RMSNorm(self.eps, self.param_dtype, name="layer_norm")(x)
        return x + UMT5Attention(self.num_heads, self.d_kv, self.num_buckets, self.max_distance,
                                 self.dtype, self.param_dtype, name="SelfAttention")(h, mask)


class UMT5LayerFF(nn.Module):
    d_ff: int
    activation: str
    gated: bool
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = RMSNorm(self.eps, self.param_dtype, name="layer_norm")(x)
        return x + UMT5FeedForward(self.d_ff, self.activation, self.gated, self.dtype,
                                   self.param_dtype, name="DenseReluDense")(h)


class UMT5Block(nn.Module):
    """One encoder block: layer_0 self-attention, layer_1 feed-forward (transformers' `UMT5Block`)."""

    d_kv: int
    d_ff: int
    num_heads: int
    num_buckets: int
    max_distance: int
    eps: float
    activation: str
    gated: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        x = UMT5LayerSelfAttention(self.num_heads, self.d_kv, self.num_buckets, self.max_distance,
                                   self.eps, self.dtype, self.param_dtype, name="layer_0")(x, mask)
        return UMT5LayerFF(self.d_ff, self.activation, self.gated, self.eps, self.dtype,
                           self.param_dtype, name="layer_1")(x)


class UMT5Stack(nn.Module):
    """Token embedding, the blocks block_0 ... block_{N-1}, the final norm."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    num_layers: int
    num_buckets: int
    max_distance: int
    eps: float
    activation: str
    gated: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask):
        x = nn.Embed(self.vocab_size, self.d_model, param_dtype=self.param_dtype,
                     embedding_init=logical_init(nn.initializers.normal(1.0), ("vocab", "embed")),
                     name="embed_tokens")(ids).astype(jnp.float32)
        for i in range(self.num_layers):
            x = nn.with_logical_constraint(x, TEXT_AXES)
            x = UMT5Block(self.d_kv, self.d_ff, self.num_heads, self.num_buckets,
                          self.max_distance, self.eps, self.activation, self.gated, self.dtype,
                          self.param_dtype, name=f"block_{i}")(x, mask)
        return RMSNorm(self.eps, self.param_dtype, name="final_layer_norm")(x)


class UMT5Encoder(nn.Module):
    """(ids (B, L) int, mask (B, L) or None) -> last hidden states (B, L, d_model) float32.

    Defaults are UMT5-XXL's; the parameters live under `encoder/` as in transformers'
    UMT5EncoderModel (its `shared` embedding is our `encoder/embed_tokens`)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    activation: str = "gelu_new"
    gated: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        if ids.ndim != 2:
            raise ValueError(f"UMT5 token ids must be (batch, length), got shape {ids.shape}")
        mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"attention mask shape {mask.shape} differs from ids {ids.shape}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"UMT5 activation {self.activation!r} is not one of "
                             f"{sorted(ACTIVATIONS)}")
        return UMT5Stack(self.vocab_size, self.d_model, self.d_kv, self.d_ff, self.num_heads,
                         self.num_layers, self.num_buckets, self.max_distance, self.eps,
                         self.activation, self.gated, self.dtype, self.param_dtype,
                         name="encoder")(jnp.asarray(ids, jnp.int32), mask)


def feed_forward_kind(config: Mapping[str, Any]) -> tuple[str, bool]:
    """(activation, gated) of a transformers T5/UMT5 config: `feed_forward_proj` 'gated-gelu' is
    GELU(tanh) ('gelu_new') gated; 'gated-ACT' or 'ACT' otherwise, as UMT5Config reads it."""
    proj = str(config.get("feed_forward_proj", "gated-gelu"))
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj {proj!r} is not 'gated-ACT' or 'ACT'")
    gated = parts[0] == "gated"
    activation = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if activation not in ACTIVATIONS:
        raise ValueError(f"feed_forward_proj {proj!r}: activation {activation!r} is not one of "
                         f"{sorted(ACTIVATIONS)}")
    return activation, gated


def umt5_from_config(config: Mapping[str, Any], dtype: str | Dtype | None = None,
                     param_dtype: str | Dtype | None = None) -> UMT5Encoder:
    """The encoder of a transformers UMT5/T5 config.json dict (the keys of UMT5_XXL; the sizes
    d_model, d_kv, d_ff, num_heads, num_layers and vocab_size must be there, the others default
    as in transformers' UMT5Config; keys that do not shape the network are ignored).

    dtype / param_dtype: a name of DTYPES or a jnp dtype, default float32 (a config.json's own
    'dtype' / 'torch_dtype' entry says how the weights were stored, not how to compute, and is
    ignored)."""
    c = {**CONFIG_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    for theirs, ours in (("hidden_size", "d_model"), ("num_attention_heads", "num_heads"),
                         ("num_hidden_layers", "num_layers"), ("head_dim", "d_kv")):
        if ours not in c and theirs in c:  # UMT5Config's attribute_map aliases
            c[ours] = c[theirs]
    missing = [key for key in REQUIRED_KEYS if key not in c]
    if missing:
        raise ValueError(f"the UMT5 config lacks {', '.join(missing)} (a transformers UMT5/T5 "
                         f"config.json has them)")
    activation, gated = feed_forward_kind(c)

    def resolve(value, what):
        if value is None:
            return jnp.float32
        if isinstance(value, str):
            if value not in DTYPES:
                raise ValueError(f"UMT5 {what} {value!r} is not one of {sorted(DTYPES)}")
            return DTYPES[value]
        return value

    return UMT5Encoder(
        vocab_size=int(c["vocab_size"]), d_model=int(c["d_model"]), d_kv=int(c["d_kv"]),
        d_ff=int(c["d_ff"]), num_heads=int(c["num_heads"]), num_layers=int(c["num_layers"]),
        num_buckets=int(c["relative_attention_num_buckets"]),
        max_distance=int(c["relative_attention_max_distance"]),
        eps=float(c["layer_norm_epsilon"]), activation=activation, gated=gated,
        dtype=resolve(dtype, "dtype"), param_dtype=resolve(param_dtype, "param_dtype"),
    )
