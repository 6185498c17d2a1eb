"""Small linen building blocks of the video DiT: attention, MLP, adaLN-Zero modulation.

Every parameter carries logical axis names; the sharding rules that map them to mesh axes live
with the training configs. The names used here:

  embed      model width D (input side of up-projections, output side of down-projections)
  embed_in   the second D of a D x D matrix that is not a head projection
  heads, kv  attention heads and per-head width
  qkv        the 3 of the fused q/k/v projection
  mlp        MLP hidden width and the adaLN modulation width (6D / 2D)
  freq       timestep frequency features
  patch      flattened patch pixels (p*p*C)
  vocab      class-embedding rows
  layers     the stacked-block axis added by nn.scan

Activations carry logical names as well, through `nn.with_logical_constraint` (a no-op unless the
model is traced under logical-axis rules and a mesh, see fvdm_jax/sharding.activation_context):

  batch       the batch (the rules split it over data x fsdp)
  act_frames  the frame axis of the token stream
  act_tokens  the spatial-token axis of the token stream
  act_embed   the width D of the token stream (not 'embed': FSDP shards weights, not activations)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash", "splash_interpret", "auto")
SPLASH_MIN_TOKENS = 4096  # 'auto' on TPU: the splash kernel for attention over this many tokens


def logical_init(init: Callable, names: Sequence[str | None]) -> Callable:
    """Wraps an initializer so that its parameter is annotated with logical axis names.

    The names are metadata only (fvdm_jax/runtime/sharding.py turns them into shardings): the box's empty
    rules make its own `unbox()` skip flax's sharding constraint, which would otherwise fire under
    an activation context, e.g. on the flattened kernel that DenseGeneral unboxes and reshapes
    while flax checks parameter shapes in every `apply` (a rank mismatch error).
    """
    return nn.with_logical_partitioning(init, tuple(names), rules=())


# Logical names of the token stream (B, F, T, D) between DiT blocks.
TOKEN_AXES = ("batch", "act_frames", "act_tokens", "act_embed")


def constrain(x: jnp.ndarray, names: Sequence[str | None]) -> jnp.ndarray:
    """Sharding constraint by logical names; the identity outside rules + mesh (and on values)."""
    return nn.with_logical_constraint(x, tuple(names))


def xavier_uniform():
    return nn.initializers.xavier_uniform()


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """adaLN modulation x * (1 + scale) + shift; shift/scale broadcast against x."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis of x (..., S, D).

    Leading axes are folded into one batch axis for `jax.nn.dot_product_attention` (no vmap).
    """

    hidden_size: int
    num_heads: int
    implementation: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        head_dim = self.hidden_size // self.num_heads
        lead, seq = x.shape[:-2], x.shape[-2]
        x = x.reshape((-1, seq, self.hidden_size))  # (..., S, D) -> (N, S, D)
        qkv = nn.DenseGeneral(
            features=(3, self.num_heads, head_dim),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical_init(xavier_uniform_fused(), ("embed", "qkv", "heads", "kv")),
            bias_init=logical_init(nn.initializers.zeros, ("qkv", "heads", "kv")),
            name="qkv",
        )(x)  # (N, S, 3, H, Dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(q, k, v, self.implementation)  # (N, S, H, Dh)
        out = nn.DenseGeneral(
            features=self.hidden_size,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical_init(xavier_uniform_fused(in_axes=(0, 1)), ("heads", "kv", "embed")),
            bias_init=logical_init(nn.initializers.zeros, ("embed",)),
            name="proj",
        )(out)
        return out.reshape(lead + (seq, self.hidden_size))


def xavier_uniform_fused(in_axes: Sequence[int] = (0,)):
    """Xavier-uniform for a DenseGeneral kernel, with fan-in/out of the equivalent 2D matrix.

    The official model initializes its fused qkv Linear (D -> 3D) and proj (D -> D) as plain 2D
    matrices; variance_scaling with explicit in/out axes reproduces those fans.
    """
    in_axes = tuple(in_axes)

    def init(key, shape, dtype=jnp.float32):
        out_axes = tuple(i for i in range(len(shape)) if i not in in_axes)
        return nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=in_axes, out_axis=out_axes
        )(key, shape, dtype)

    return init


def dot_product_attention(q, k, v, implementation: str, key_mask=None):
    """softmax(q k^T / sqrt(d)) v on (N, S, H, Dh) arrays (k, v (N, L, H, Dh)); key_mask (N, L)
    bool, True where a key is attended.

    'cudnn' asks for the fused cuDNN kernel (GPU, fp16/bf16); 'splash' for TPU's Pallas kernel
    (fvdm_jax/models/splash.py; 'splash_interpret' runs it through the Pallas interpreter on any
    backend); 'xla' is the portable path; 'auto' is `resolve_attention`'s choice for this length.
    """
    implementation = resolve_attention(implementation, q.dtype, tokens=q.shape[1])
    if implementation.startswith("splash"):
        from fvdm_jax.models.splash import splash_attention

        return splash_attention(q, k, v, key_mask,
                                interpret=implementation == "splash_interpret")
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def resolve_attention(implementation: str, dtype, backend: str | None = None,
                      tokens: int | None = None) -> str:
    """The implementation a model.attention setting runs with for inputs of `dtype` on `backend`
    (default: jax's; --mode=compile passes the target's) over `tokens` query tokens: 'auto' is
    cuDNN on GPU in half precision, the splash kernel on TPU from SPLASH_MIN_TOKENS tokens on
    (below, XLA's scores are small and splash's blocks would be mostly padding), XLA elsewhere."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention={implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
        )
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    if backend == "tpu" and tokens is not None and tokens >= SPLASH_MIN_TOKENS:
        return "splash"
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if backend == "gpu" and half else "xla"


class Mlp(nn.Module):
    """Dense(D -> hidden) -> GELU (tanh approximation) -> Dense(hidden -> D)."""

    hidden_size: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical_init(xavier_uniform(), ("embed", "mlp")),
            bias_init=logical_init(nn.initializers.zeros, ("mlp",)),
            name="fc1",
        )(x)
        h = nn.gelu(h, approximate=True)
        return nn.Dense(
            self.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical_init(xavier_uniform(), ("mlp", "embed")),
            bias_init=logical_init(nn.initializers.zeros, ("embed",)),
            name="fc2",
        )(h)


class AdaLNModulation(nn.Module):
    """c (..., D) -> `chunks` tensors (..., D) through SiLU and a zero-initialized Dense."""

    hidden_size: int
    chunks: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: jnp.ndarray):
        out = nn.Dense(
            self.chunks * self.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical_init(nn.initializers.zeros, ("embed", "mlp")),
            bias_init=logical_init(nn.initializers.zeros, ("mlp",)),
            name="dense",
        )(nn.silu(c))
        return jnp.split(out, self.chunks, axis=-1)


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm without affine parameters, eps 1e-6 (statistics in float32)."""
    return nn.LayerNorm(
        epsilon=1e-6,
        use_bias=False,
        use_scale=False,
        use_fast_variance=False,
        dtype=dtype,
        name=name,
    )
