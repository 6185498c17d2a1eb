"""The device mesh, logical-axis rules, and the shardings of state, batches and activations.

Mesh axes (data, fsdp, tensor) come from `config.mesh`. Parameters carry logical axis names (see
fvdm_jax/models/layers.py); `config.mesh.rules` maps them to mesh axes with flax's own priority
rules (`nn.logical_to_mesh_axes`: rules apply in order, a mesh axis is used at most once per
array, the first rule that names a logical axis wins): FSDP shards the model width over `fsdp`,
heads and MLP width go over `tensor`, the batch over (data, fsdp). Mesh axes that the mesh does
not have are dropped from the rules.

A dimension that its mesh axes do not divide stays replicated along them; `logical_shardings`
logs one warning naming every such parameter, or raises with `config.mesh.strict = True`.

Activations carry logical names too (`act_*` and `batch`, see `DiT`): the model constrains its
token activations with `nn.with_logical_constraint`, which is a no-op unless the model is traced
inside `activation_context(mesh, rules)`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fvdm_jax.errors import ConfigError


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry to the remaining devices; checks the product."""
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise ConfigError(f"config.mesh.shape={tuple(shape)} may contain at most one -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"config.mesh.shape={tuple(shape)} must hold positive sizes or one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh.shape={tuple(shape)}: {num_devices} devices are not divisible by {known}"
            )
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) > num_devices:
        raise ConfigError(
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
        raise ConfigError(f"config.mesh.axes={axes} and config.mesh.shape={shape} differ in length")
    n = math.prod(shape)
    if n != len(devices) and jax.process_count() > 1:
        raise ConfigError(
            f"config.mesh.shape={shape} uses {n} of {len(devices)} devices; a multi-process run "
            f"must use them all (set one size to -1)"
        )
    if n != len(devices):
        logging.warning("config.mesh.shape=%s uses %d of %d devices; the other %d stay idle (set "
                        "one size to -1 to use them all)", shape, n, len(devices), len(devices) - n)
    devices, types = devices[:n], (jax.sharding.AxisType.Auto,) * len(axes)
    slices = {getattr(d, "slice_index", None) for d in devices}
    if len(slices) > 1 and devices[0].platform == "tpu":  # multislice (jax.make_mesh refuses it)
        return Mesh(_hybrid_devices(shape, axes, devices, len(slices)), axes, axis_types=types)
    try:
        return jax.make_mesh(shape, axes, axis_types=types, devices=devices)
    except NotImplementedError as error:
        # e.g. 8x8x1 on a 4x4x4 v5p slice: no assignment keeps each mesh axis on whole physical
        # axes ("... set allow_split_physical_axes"); split them (more ICI hops, still correct).
        if "allow_split_physical_axes" not in str(error):
            raise
        logging.info("config.mesh.shape=%s splits physical axes of the %s slice", shape,
                     devices[0].device_kind)
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, axes, axis_types=types)


def _hybrid_devices(shape, axes, devices, num_slices: int) -> np.ndarray:
    """The device grid of a multi-slice mesh: the first axis divisible by the slice count (the
    data axis by default) spans the slices over DCN, the rest stays within each slice (ICI)."""
    axis = next((i for i, s in enumerate(shape) if s % num_slices == 0), None)
    if axis is None:
        raise ConfigError(f"config.mesh.shape={shape}: no axis of {axes} divides by the "
                          f"{num_slices} slices (the data axis usually spans them)")
    ici = [s // num_slices if i == axis else s for i, s in enumerate(shape)]
    dcn = [num_slices if i == axis else 1 for i in range(len(shape))]
    try:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    except NotImplementedError:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)


def rules_from_config(mesh_config: Mapping[str, Any]) -> tuple:
    """config.mesh.rules (configs/default.py holds the table) as a tuple of (logical, mesh axes)."""
    rules = mesh_config.get("rules")
    if not rules:
        raise ValueError("config.mesh.rules is empty: keep the table of configs/default.py or "
                         "give (logical name, mesh axes) pairs")
    return tuple((str(name), tuple(axis) if isinstance(axis, list) else axis) for name, axis in rules)


def strict_from_config(mesh_config: Mapping[str, Any]) -> bool:
    """config.mesh.strict: raise instead of replicating a parameter dim the mesh does not divide."""
    return bool(mesh_config.get("strict", False))


def mesh_rules(mesh: Mesh, rules) -> tuple:
    """The rules with the mesh axes that `mesh` lacks removed (a rule left empty maps to None)."""
    out = []
    for name, axis in rules:
        if axis is not None:
            members = axis if isinstance(axis, (tuple, list)) else (axis,)
            members = tuple(a for a in members if a in mesh.shape)
            axis = members if len(members) > 1 else (members[0] if members else None)
        out.append((name, axis))
    return tuple(out)


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    axes = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in axes)


def _axis_text(mesh: Mesh, axis) -> str:
    axes = axis if isinstance(axis, tuple) else (axis,)
    return "x".join(f"{a}={mesh.shape[a]}" for a in axes)


def _divisible_spec(shape, logical, mesh: Mesh, rules):
    """(PartitionSpec, [(dim, size, logical name, mesh axis) dropped as not dividing])."""
    if logical is None:
        return PartitionSpec(), []
    spec = nn.logical_to_mesh_axes(tuple(logical), mesh_rules(mesh, rules))
    entries, dropped = [], []
    for dim, (size, axis) in enumerate(zip(shape, tuple(spec))):
        if axis is not None and size % _axis_size(mesh, axis):
            dropped.append((dim, int(size), logical[dim], axis))
            axis = None
        entries.append(axis)
    return PartitionSpec(*entries), dropped


def spec_for(shape: Sequence[int], logical: Sequence[str | None] | None, mesh: Mesh, rules) -> PartitionSpec:
    """PartitionSpec of an array from its logical axis names; non-dividing axes are dropped."""
    return _divisible_spec(tuple(shape), logical, mesh, rules)[0]


def _param_path(path) -> str:
    """'params/blocks/spatial/attn/qkv/kernel' for a leaf of a variables tree, of a TrainState
    (params, EMA, optimizer moments: the part from the last 'params' collection key on)."""
    starts = [i for i, k in enumerate(path) if isinstance(k, jax.tree_util.DictKey) and k.key == "params"]
    path = path[starts[-1]:] if starts else path
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def logical_shardings(boxed_tree, mesh: Mesh, rules, *, strict: bool = False):
    """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned boxes.

    The logical specs come from `nn.get_partition_spec` and go through `nn.logical_to_mesh_axes`
    (flax's rule priority); a dimension its mesh axes do not divide is replicated, with one
    warning that names every such parameter, or a ValueError when `strict`.
    """
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    dropped: dict[str, list] = {}

    def leaf_sharding(path, leaf):
        if not is_box(leaf):
            return NamedSharding(mesh, PartitionSpec())
        names = tuple(nn.get_partition_spec(leaf))  # the box's logical PartitionSpec
        spec, bad = _divisible_spec(leaf.value.shape, names, mesh, rules)
        if bad:
            dropped.setdefault(_param_path(path), bad)
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(leaf_sharding, boxed_tree, is_leaf=is_box)
    if dropped:
        items = "; ".join(
            f"{path} dim {dim} ({name!r}) of size {size} not divisible by {_axis_text(mesh, axis)}"
            for path, bad in sorted(dropped.items())
            for dim, size, name, axis in bad
        )
        if strict:
            raise ConfigError(
                f"config.mesh.strict: {len(dropped)} parameter(s) cannot be sharded as the rules "
                f"ask: {items}; change config.mesh.shape or the model width (or set "
                f"config.mesh.strict=False to replicate those dims)"
            )
        logging.warning(
            "%d parameter(s) stay replicated along mesh axes that do not divide them (change "
            "config.mesh.shape or the model width; config.mesh.strict=True makes this an "
            "error): %s", len(dropped), items,
        )
    return shardings


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Batch arrays (B, ...) sharded along their first axis over the 'batch' rule's axes."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), mesh_rules(mesh, rules))
    return NamedSharding(mesh, spec)


def batch_divisor(mesh: Mesh, rules) -> int:
    """How many ways the global batch is split (the data x fsdp size by default)."""
    return _axis_size(mesh, batch_sharding(mesh, rules, 1).spec[0])


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict:
    """Per-host numpy batches -> global jax Arrays sharded over the batch axes."""
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, value.ndim), value)
        for key, value in host_batch.items()
    }


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules):
    """`jax.set_mesh(mesh)` + `nn.logical_axis_rules(rules)`: trace (jit, lower) a model inside it
    and its `nn.with_logical_constraint` calls become sharding constraints; outside, they are
    no-ops. Enter it outside jax.jit (jax.set_mesh may not be used inside a trace)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_rules(mesh, rules)):
        yield
