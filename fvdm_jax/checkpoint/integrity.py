"""Fingerprints of array trees: a checkpoint that cannot be silently wrong.

`fingerprints(tree)` maps every leaf's path to its shape, dtype and two 32-bit checksums of its
bytes, computed on the devices in one jitted call (sharded arrays are reduced across the mesh, so
every process gets the same numbers): the wrapping sum of the bit patterns, and a sum weighted by
the element index (which also catches two flips that cancel in the plain sum, and swapped
elements). A single flipped bit changes both. `compare` lists what differs; `non_finite` lists
the floating leaves holding NaN or inf.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_GOLDEN = np.uint32(2654435761)  # Knuth's multiplicative hash constant


def _bits(x):
    """The bit patterns of x as uint32 (bool and 1/2-byte types widened)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size not in _UNSIGNED:
        raise ValueError(f"no fingerprint for dtype {x.dtype} (8-byte types need jax x64)")
    return jax.lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32)


def _checksums(x):
    bits = _bits(x).reshape(-1)
    index = jax.lax.iota(jnp.uint32, bits.shape[0])
    weights = index * _GOLDEN + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


def _all_finite(x):
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


_checksum_tree = jax.jit(lambda tree: jax.tree_util.tree_map(_checksums, tree))
_finite_tree = jax.jit(lambda tree: jax.tree_util.tree_map(_all_finite, tree))


def _paths(tree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in leaves]


def fingerprints(tree) -> dict[str, dict]:
    """{path: {'shape', 'dtype', 'sum'}} for every array leaf of `tree` (JSON-ready)."""
    sums = jax.device_get(_checksum_tree(tree))
    out = {}
    for (path, leaf), (_, value) in zip(_paths(tree), _paths(sums)):
        out[path] = {"shape": list(np.shape(leaf)), "dtype": str(jnp.dtype(leaf.dtype)),
                     "sum": [int(v) for v in np.asarray(value)]}
    return out


def compare(saved: Mapping[str, dict], restored: Mapping[str, dict], prefix: str = "") -> list[str]:
    """The paths (under `prefix`, e.g. 'ema_params/') whose fingerprint differs or is missing."""
    keys = [k for k in saved if k.startswith(prefix)]
    return [k for k in keys if k not in restored or restored[k] != saved[k]]


def shape_mismatches(saved: Mapping[str, dict], abstract) -> list[str]:
    """'path: saved (..) vs wanted (..)' for leaves of `abstract` whose shape or dtype differ
    from the saved fingerprints (a changed recipe, not a damaged file)."""
    wrong = []
    for path, leaf in _paths(abstract):
        entry = saved.get(path)
        if entry is None:
            continue
        if tuple(entry["shape"]) != tuple(leaf.shape) or entry["dtype"] != str(jnp.dtype(leaf.dtype)):
            wrong.append(f"{path}: saved {tuple(entry['shape'])} {entry['dtype']} vs wanted "
                         f"{tuple(leaf.shape)} {jnp.dtype(leaf.dtype)}")
    return wrong


def non_finite(tree) -> list[str]:
    """The paths of floating leaves that hold NaN or inf."""
    flags = jax.device_get(_finite_tree(tree))
    return [path for (path, ok) in _paths(flags) if not bool(ok)]
