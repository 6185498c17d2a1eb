"""The device mesh, logical-axis rules, and the shardings of state and batches.

Mesh axes (data, fsdp, tensor) come from `config.mesh`. Parameters carry logical axis names (see
fvdm_jax/models/layers.py); `config.mesh.rules` maps them to mesh axes: FSDP shards the model width
over `fsdp`, heads and MLP width go over `tensor`, the batch over (data, fsdp). A dimension that a
mesh axis does not divide stays replicated along that axis.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical name -> mesh axis (or tuple of axes, or None). The defaults of config.mesh.rules.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("embed_in", None),
    ("freq", None),
    ("patch", None),
    ("vocab", None),
    ("layers", None),
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry to the remaining devices; checks the product."""
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh.shape={tuple(shape)} may contain at most one -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh.shape={tuple(shape)} must hold positive sizes or one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"config.mesh.shape={tuple(shape)}: {num_devices} devices are not divisible by {known}"
            )
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) > num_devices:
        raise ValueError(
            f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, "
            f"but {num_devices} are available"
        )
    return tuple(shape)


def make_mesh(mesh_config: Mapping[str, Any], devices=None) -> Mesh:
    """A Mesh over the first prod(shape) devices with Auto axis types (GSPMD-style linen code)."""
    devices = list(jax.devices() if devices is None else devices)
    axes = tuple(mesh_config["axes"])
    shape = mesh_shape(mesh_config["shape"], len(devices))
    if len(axes) != len(shape):
        raise ValueError(f"config.mesh.axes={axes} and config.mesh.shape={shape} differ in length")
    n = math.prod(shape)
    if n != len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"config.mesh.shape={shape} uses {n} of {len(devices)} devices; a multi-process run "
            f"must use them all (set one size to -1)"
        )
    if n != len(devices):
        logging.warning("config.mesh.shape=%s uses %d of %d devices; the other %d stay idle (set "
                        "one size to -1 to use them all)", shape, n, len(devices), len(devices) - n)
    return jax.make_mesh(
        shape,
        axes,
        axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
        devices=devices[:n],
    )


def rules_from_config(mesh_config: Mapping[str, Any]) -> tuple:
    rules = mesh_config.get("rules") or DEFAULT_RULES
    return tuple((str(name), tuple(axis) if isinstance(axis, list) else axis) for name, axis in rules)


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    axes = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(shape: Sequence[int], logical: Sequence[str | None] | None, mesh: Mesh, rules) -> PartitionSpec:
    """PartitionSpec of an array from its logical axis names; non-dividing axes are dropped."""
    if logical is None:
        return PartitionSpec()
    rule_map = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, logical):
        axis = rule_map.get(name) if name is not None else None
        if axis is not None:
            members = axis if isinstance(axis, tuple) else (axis,)
            members = tuple(a for a in members if a in mesh.shape and a not in used)
            axis = members if len(members) > 1 else (members[0] if members else None)
        if axis is None or dim % _axis_size(mesh, axis):
            spec.append(None)
            continue
        used.update(axis if isinstance(axis, tuple) else (axis,))
        spec.append(axis)
    return PartitionSpec(*spec)


def logical_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned boxes."""

    def leaf_sharding(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_for(leaf.value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(
        leaf_sharding, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Batch arrays (B, ...) sharded along their first axis over the 'batch' rule's axes."""
    spec = spec_for((0,), ("batch",), mesh, rules)  # 0 is divisible by everything
    return NamedSharding(mesh, PartitionSpec(spec[0], *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh, rules) -> int:
    """How many ways the global batch is split (the data x fsdp size by default)."""
    axis = dict(rules).get("batch")
    if axis is None:
        return 1
    members = tuple(a for a in (axis if isinstance(axis, tuple) else (axis,)) if a in mesh.shape)
    return math.prod(mesh.shape[a] for a in members)


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict:
    """Per-host numpy batches -> global jax Arrays sharded over the batch axes."""
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, value.ndim), value)
        for key, value in host_batch.items()
    }
