"""The Latte-style video DiT of FVDM with a vectorized (per-frame) timestep, in linen.

Layout is channels-last: x (B, F, H, W, C), frame timesteps (B, F), labels (B,) or None, output
(B, F, H, W, 2C) when learn_sigma (eps first, then the variance-interpolation values).

Depth/2 spatial blocks (attention over the tokens of one frame) alternate with depth/2 temporal
blocks (attention over the frames of one spatial position). Every block is conditioned by
adaLN-Zero on its frame's embedding c = t_emb(tau_f) (+ y_emb). Spatial/temporal pairs are
stored stacked along a leading 'layers' axis and run by `nn.scan`; `scan_layers=False` unrolls
that scan without changing the parameter tree.

The token stream is constrained by logical names (batch, act_frames, act_tokens, act_embed) after
the patch embedding, after every block and before the final layer; the names become sharding
constraints only when traced under fvdm_jax.runtime.sharding.activation_context (else no-ops).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.models.embeddings import LabelEmbedder, TimestepEmbedder, sincos_1d, sincos_2d
from fvdm_jax.models.layers import (
    TOKEN_AXES,
    AdaLNModulation,
    Attention,
    Dtype,
    Mlp,
    constrain,
    layer_norm,
    logical_init,
    modulate,
    xavier_uniform,
)

# The token stream of a temporal block, (B, T, F, D).
TEMPORAL_TOKEN_AXES = ("batch", "act_tokens", "act_frames", "act_embed")

# (hidden_size, depth, num_heads) of the named sizes; patch size is chosen separately (2, 4, 8).
MODEL_SIZES = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}

REMAT_POLICIES = ("auto", "none", "full", "dots", "dots_no_batch")

# What 'auto' means per backend, measured with bench/train_ab.py (docs/benchmarks.md): on CPU,
# saving only the matmul outputs and recomputing the rest in the backward pass makes the S/2 train
# step ~27% faster (less memory traffic than storing every residual); on GPU/TPU no remat, which
# adds no FLOPs (trade memory for compute there with model.remat=dots explicitly).
AUTO_REMAT = {"cpu": "dots"}


def resolve_remat(name: str, backend: str | None = None) -> str:
    """The remat policy a model.remat setting runs with on `backend` (default: jax's)."""
    if name != "auto":
        return name
    return AUTO_REMAT.get(backend or jax.default_backend(), "none")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; attention runs over axis -2 of x (B, A, S, D).

    c is the per-frame conditioning, shaped to broadcast against x: (B, F, 1, D) for a spatial
    block (x is (B, F, T, D)), (B, 1, F, D) for a temporal block (x is (B, T, F, D)). The
    modulation is computed once per frame and broadcast over positions.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    attention: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLNModulation(
            self.hidden_size, 6, name="adaLN", **kw
        )(c)
        h = modulate(layer_norm(self.dtype)(x), shift_msa, scale_msa)
        x = x + gate_msa * Attention(
            self.hidden_size, self.num_heads, self.attention, name="attn", **kw
        )(h)
        h = modulate(layer_norm(self.dtype)(x), shift_mlp, scale_mlp)
        x = x + gate_mlp * Mlp(
            self.hidden_size, int(self.hidden_size * self.mlp_ratio), name="mlp", **kw
        )(h)
        return x


class SpatialTemporalPair(nn.Module):
    """One spatial block then one temporal block; the body of the layer scan."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    attention: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, c, temp_embed, layer_index):
        # x (B, F, T, D); c (B, F, D); temp_embed (F, D); layer_index () int.
        block = lambda name: DiTBlock(  # noqa: E731
            self.hidden_size,
            self.num_heads,
            self.mlp_ratio,
            self.attention,
            self.dtype,
            self.param_dtype,
            name=name,
        )
        x = constrain(block("spatial")(x, c[:, :, None, :]), TOKEN_AXES)
        # The temporal table is added once, after the first spatial block (official placement).
        first = (layer_index == 0).astype(x.dtype)
        x = x + first * temp_embed[None, :, None, :]
        x = einops.rearrange(x, "b f t d -> b t f d")
        x = constrain(block("temporal")(x, c[:, None, :, :]), TEMPORAL_TOKEN_AXES)
        x = einops.rearrange(x, "b t f d -> b f t d")
        return constrain(x, TOKEN_AXES), None


def remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


class DiT(nn.Module):
    """FVDM video DiT. See the module docstring for shapes; `drop_labels` for label dropout."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_frames: int = 16
    num_classes: int = 0
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"
    scan_layers: bool = True
    remat: str = "auto"

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def tokens_per_frame(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def frozen_table_size(self) -> int:
        """Entries of the frozen (non-trainable) spatial and temporal sin-cos tables."""
        return (self.tokens_per_frame + self.num_frames) * self.hidden_size

    def _check_architecture(self):
        if self.input_size % self.patch_size:
            raise ValueError(
                f"model.input_size={self.input_size} is not divisible by "
                f"model.patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by 4")
        if self.depth % 2 or self.depth < 2:
            raise ValueError(
                f"model.depth={self.depth} must be even: it counts spatial + temporal blocks"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} is not one of {REMAT_POLICIES}")

    def _check_inputs(self, x, frame_timesteps, labels):
        expect = (self.num_frames, self.input_size, self.input_size, self.in_channels)
        if x.ndim != 5 or tuple(x.shape[1:]) != expect:
            raise ValueError(
                f"x has shape {tuple(x.shape)} but the model expects (B, F, H, W, C) with "
                f"(F, H, W, C) = {expect} (model.num_frames, model.input_size twice, "
                f"model.in_channels); fix the data or the model config"
            )
        # dtypes (static, checked while tracing): uint8 frames would be cast and silently wrong.
        chex.assert_type(x, float, custom_message="x: pixels in [-1, 1] or scaled latents, a "
                         "float array; scale uint8 frames first (value / 127.5 - 1)")
        if tuple(frame_timesteps.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"frame_timesteps has shape {tuple(frame_timesteps.shape)}; expected one "
                f"timestep per frame, shape (B, F) = {tuple(x.shape[:2])} (broadcast a scalar "
                f"timestep with jnp.broadcast_to(t[:, None], (B, F)))"
            )
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(
                    f"the model is class-conditional (model.num_classes={self.num_classes}): "
                    f"pass labels of shape (B,) = ({x.shape[0]},)"
                )
            if tuple(labels.shape) != (x.shape[0],):
                raise ValueError(
                    f"labels have shape {tuple(labels.shape)}; expected (B,) = ({x.shape[0]},)"
                )
            chex.assert_type(labels, int, custom_message=f"labels: class ids in [0, "
                             f"{self.num_classes}] ({self.num_classes}: the null class), integers")
        elif labels is not None:
            raise ValueError(
                "labels were given to an unconditional model (model.num_classes=0); "
                "pass labels=None or set model.num_classes"
            )

    @nn.compact
    def __call__(self, x, frame_timesteps, labels=None):
        """x (B, F, H, W, C), frame_timesteps (B, F) int/float -> (B, F, H, W, out_channels)."""
        self._check_architecture()
        self._check_inputs(x, frame_timesteps, labels)
        p, d = self.patch_size, self.hidden_size
        grid = self.input_size // p
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # Per-frame patch embedding: a stride-p conv written as a Dense on flattened patches.
        tokens = einops.rearrange(
            x.astype(self.dtype), "b f (h p) (w q) c -> b f (h w) (p q c)", p=p, q=p
        )
        x = nn.Dense(
            d,
            kernel_init=logical_init(xavier_uniform(), ("patch", "embed")),
            bias_init=logical_init(nn.initializers.zeros, ("embed",)),
            name="x_embedder",
            **kw,
        )(tokens)  # (B, F, T, D)
        x = x + jnp.asarray(sincos_2d(d, grid), self.dtype)
        # Token activations carry logical names at every block boundary (sharding.py maps them;
        # without rules and a mesh in context the constraints are no-ops).
        x = constrain(x, TOKEN_AXES)
        temp_embed = jnp.asarray(sincos_1d(d, np.arange(self.num_frames)), self.dtype)

        c = TimestepEmbedder(d, name="t_embedder", **kw)(frame_timesteps)  # (B, F, D)
        if self.num_classes > 0:
            y = LabelEmbedder(
                self.num_classes,
                d,
                with_null_class=self.class_dropout_prob > 0,
                param_dtype=self.param_dtype,
                name="y_embedder",
            )(labels)
            c = c + y.astype(c.dtype)[:, None, :]

        pair = SpatialTemporalPair
        remat = resolve_remat(self.remat)
        if remat != "none":
            pair = nn.remat(pair, policy=remat_policy(remat), prevent_cse=False)
        num_pairs = self.depth // 2
        blocks = nn.scan(
            pair,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0),
            length=num_pairs,
            unroll=1 if self.scan_layers else num_pairs,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = blocks(
            d, self.num_heads, self.mlp_ratio, self.attention, name="blocks", **kw
        )(x, c, temp_embed, jnp.arange(num_pairs))
        x = constrain(x, TOKEN_AXES)

        shift, scale = AdaLNModulation(d, 2, name="final_adaLN", **kw)(c)
        x = modulate(layer_norm(self.dtype)(x), shift[:, :, None], scale[:, :, None])
        x = nn.Dense(
            p * p * self.out_channels,
            kernel_init=logical_init(nn.initializers.zeros, ("embed", "patch")),
            bias_init=logical_init(nn.initializers.zeros, ("patch",)),
            name="final_linear",
            **kw,
        )(x)
        x = einops.rearrange(x, "b f (h w) (p q c) -> b f (h p) (w q) c", h=grid, p=p, q=p)
        return x.astype(jnp.float32)


def drop_labels(rng: jax.Array, labels: jnp.ndarray, prob: float, num_classes: int):
    """Replaces each label by the null class `num_classes` with probability `prob` (training)."""
    drop = jax.random.uniform(rng, labels.shape) < prob
    return jnp.where(drop, num_classes, labels)


def resolve_size(model_config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(hidden_size, depth, num_heads) from model.size, or from the explicit keys when 'custom'."""
    size = model_config["size"]
    explicit = tuple(model_config.get(k) for k in ("hidden_size", "depth", "num_heads"))
    if size == "custom":
        if any(v is None for v in explicit):
            raise ValueError(
                "model.size='custom' needs model.hidden_size, model.depth and model.num_heads"
            )
        return tuple(int(v) for v in explicit)
    if size not in MODEL_SIZES:
        raise ValueError(
            f"model.size={size!r} is not one of {sorted(MODEL_SIZES)} or 'custom'"
        )
    named = MODEL_SIZES[size]
    for key, given, want in zip(("hidden_size", "depth", "num_heads"), explicit, named):
        if given is not None and int(given) != want:
            raise ValueError(
                f"model.{key}={given} contradicts model.size={size!r} ({key}={want}); "
                f"set model.size=custom to choose the dimensions freely"
            )
    return named


def model_from_config(model_config: Mapping[str, Any]) -> DiT:
    """Builds the DiT from the `model` config section (a ConfigDict or a plain dict)."""
    hidden, depth, heads = resolve_size(model_config)
    for key in ("dtype", "param_dtype"):
        if model_config.get(key, "float32") not in DTYPES:
            raise ValueError(f"model.{key}={model_config[key]!r} is not one of {list(DTYPES)}")
    return DiT(
        input_size=int(model_config["input_size"]),
        patch_size=int(model_config["patch_size"]),
        in_channels=int(model_config["in_channels"]),
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=float(model_config.get("mlp_ratio", 4.0)),
        num_frames=int(model_config["num_frames"]),
        num_classes=int(model_config.get("num_classes", 0)),
        class_dropout_prob=float(model_config.get("class_dropout_prob", 0.1)),
        learn_sigma=bool(model_config.get("learn_sigma", True)),
        dtype=DTYPES[model_config.get("dtype", "float32")],
        param_dtype=DTYPES[model_config.get("param_dtype", "float32")],
        attention=str(model_config.get("attention", "xla")),
        scan_layers=bool(model_config.get("scan_layers", True)),
        remat=str(model_config.get("remat", "auto")),
    )
