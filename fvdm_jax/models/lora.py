"""Low-rank adapters (LoRA) on the linear layers of a model, computed as peft computes them.

A targeted layer keeps its frozen `kernel` (and `bias`) and gains `lora_down` (in..., r) and
`lora_up` (r, out...): y = x W + b + (alpha / r) (x A) B. The adapter runs beside the base weight
on the activations (no merged weight, so a small update is not rounded away in a bf16 kernel).
A is drawn as peft's kaiming-uniform (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B starts at zero, so
a fresh adapter changes nothing. The adapters carry the logical names of the kernel's input and
output axes (sharded like the layer they adapt; the rank axis is replicated).

`LoRA` is the hashable setting a model holds (rank 0 = no adapters); `Linear` the layer;
`merge` folds adapters into their kernels (W + alpha / r A B: an export's merged weights).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fvdm_jax.models.layers import logical_init

# Pusa's targets on Wan: q, k, v, o of self- and cross-attention and both FFN linears.
WAN_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
               "ffn.fc1", "ffn.fc2")
ADAPTER_NAMES = ("lora_down", "lora_up")


@dataclasses.dataclass(frozen=True)
class LoRA:
    """rank (0 = off), alpha (None = rank: scale 1), targets ('<module>.<layer>' names)."""

    rank: int = 0
    alpha: float | None = None
    targets: tuple[str, ...] = WAN_TARGETS

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank} must be >= 0 (0 = no adapters)")
        unknown = sorted(set(self.targets) - set(WAN_TARGETS))
        if unknown:
            raise ValueError(f"lora.targets has {unknown}; choose from {WAN_TARGETS}")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else float(self.alpha)) / max(self.rank, 1)

    def on(self, name: str) -> bool:
        return self.rank > 0 and name in self.targets


def kaiming_uniform_in(fan_in: int) -> Callable:
    """peft's lora_A init (kaiming_uniform_ with a = sqrt(5)): U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
    """DenseGeneral over the last `len(in_names)` axes (kernel (in..., out...), as flax's, same
    parameter names) plus the LoRA adapter when `lora.rank` > 0."""

    features: tuple[int, ...]
    in_names: tuple[str | None, ...]
    out_names: tuple[str | None, ...]
    kernel_init: Callable
    lora: LoRA
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n_in = len(self.in_names)
        in_shape, out = tuple(x.shape[-n_in:]), tuple(self.features)
        kernel = self.param("kernel", logical_init(self.kernel_init, self.in_names + self.out_names),
                            in_shape + out, self.param_dtype)
        bias = self.param("bias", logical_init(nn.initializers.zeros, self.out_names), out,
                          self.param_dtype)
        lead = x.shape[:-n_in]
        flat = x.reshape(lead + (-1,)).astype(self.dtype)
        fan_in, width = math.prod(in_shape), math.prod(out)
        y = flat @ kernel.astype(self.dtype).reshape(fan_in, width) + bias.astype(self.dtype).ravel()
        if self.lora.rank > 0:
            r = self.lora.rank
            down = self.param("lora_down", logical_init(kaiming_uniform_in(fan_in),
                              self.in_names + (None,)), in_shape + (r,), self.param_dtype)
            up = self.param("lora_up", logical_init(nn.initializers.zeros, (None,) + self.out_names),
                            (r,) + out, self.param_dtype)
            low = flat @ down.astype(self.dtype).reshape(fan_in, r)
            y = y + (low @ up.astype(self.dtype).reshape(r, width)) * jnp.asarray(
                self.lora.scale, self.dtype)
        return y.reshape(lead + out)


def is_adapter(path: Sequence[Any]) -> bool:
    """Whether a parameter path (keys or jax key entries) names an adapter leaf."""
    last = path[-1]
    return str(getattr(last, "key", last)) in ADAPTER_NAMES


def merge(params, lora: LoRA):
    """{'params': ...} with every adapter folded into its kernel (kernel + scale A B, computed in
    float32, stored in the kernel's dtype) and the adapter leaves removed."""
    def fold(tree):
        if not isinstance(tree, dict):
            return tree
        if "lora_down" in tree and "kernel" in tree:
            kernel, down, up = tree["kernel"], tree["lora_down"], tree["lora_up"]
            lead = down.ndim + up.ndim - 2 - kernel.ndim  # leading (stacked-layer) axes
            r = down.shape[-1]
            a = jnp.reshape(down, down.shape[:lead] + (-1, r)).astype(jnp.float32)
            b = jnp.reshape(up, up.shape[:lead] + (r, -1)).astype(jnp.float32)
            delta = (a @ b).reshape(kernel.shape) * lora.scale
            merged = {k: v for k, v in tree.items() if k not in ADAPTER_NAMES}
            merged["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
            return merged
        return {k: fold(v) for k, v in tree.items()}

    return fold(dict(params))


def split(params):
    """{'params': tree} -> (adapters, frozen): two {'params': ...} trees, the adapter leaves in
    the first, every other leaf in the second (dicts that end up empty are dropped)."""
    def part(tree, keep):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) or hasattr(value, "items"):
                sub = part(value, keep)
                if sub:
                    out[key] = sub
            elif (key in ADAPTER_NAMES) == keep:
                out[key] = value
        return out

    tree = params["params"]
    return {"params": part(tree, True)}, {"params": part(tree, False)}


def join(frozen, adapters):
    """The full {'params': ...} tree of `split`'s two parts."""
    def both(a, b):
        out = dict(a)
        for key, value in b.items():
            out[key] = both(a[key], value) if key in a and hasattr(value, "items") else value
        return out

    return {"params": both(frozen["params"], adapters["params"])}
