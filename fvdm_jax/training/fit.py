"""Layouts of the train step that fit the device memory, chosen by the compiler's own plan.

A layout is what changes memory and communication but not the maths: the mesh (data x fsdp x
tensor), the remat policy and gradient accumulation (micro-batches of the same global batch; PTSS
and the noise are drawn for the whole batch, training/step.py). XLA's memory plan of the compiled
step says whether one fits (XLA:TPU refuses one that does not in seconds, RESOURCE_EXHAUSTED; on a
GPU the plan is compared with the device's memory), so both searches below compile, allocating
nothing:

- `first_fit` (config.mesh.fit, at the start of training and in --mode=compile): the configured
  layout if it fits, else the first that does in the order of `levels`: fewer micro-batches first,
  then less recomputation (remat none, dots, dots_no_batch, full), then meshes with the least
  sharding (data before fsdp before tensor); unrolled layers last. On a CPU (no device memory to exceed) nothing is
  compiled: the configured layout if the batch divides over it, else the first mesh that does
  (with the configured remat and micro-batches).
- `search` (config.compile.fit, --mode=compile): breadth-first over the same levels; every mesh of
  a level is compiled, and the first level with a fit gives the layout with the fewest collective
  bytes per step (least recomputation, then least communication).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import jax
import numpy as np

from fvdm_jax.errors import ConfigError
from fvdm_jax.models.wan import Wan
from fvdm_jax.runtime import compiled as xla
from fvdm_jax.runtime import sharding as shd

# In order of recomputation in the backward pass (models/dit.py's policies).
RECOMPUTE = ("none", "dots", "dots_no_batch", "full")
GRAD_ACCUM = (1, 2, 4, 8)
UNROLLED_RECOMPUTE = ("none", "dots")
WAN_TEXT_LENGTH = 512  # the text tokens of a Wan batch when data.text_length is None (Wan pads to it)


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh_shape: tuple[int, ...]  # sizes of config.mesh.axes
    remat: str
    grad_accum_steps: int
    scan_layers: bool = True

    def flags(self) -> str:
        """The command-line overrides that select this layout."""
        shape = ",".join(str(s) for s in self.mesh_shape)
        return (f'--config.mesh.shape="({shape})" --config.model.remat={self.remat} '
                f"--config.train.grad_accum_steps={self.grad_accum_steps} "
                f"--config.model.scan_layers={self.scan_layers}")

    def describe(self, axes: Sequence[str]) -> str:
        mesh = " x ".join(f"{a} {s}" for a, s in zip(axes, self.mesh_shape))
        micro = (f", {self.grad_accum_steps} micro-batches" if self.grad_accum_steps > 1 else "")
        layers = "" if self.scan_layers else ", layers unrolled"
        return f"mesh {mesh}, remat {self.remat}{micro}{layers}"

    def apply(self, config):
        """A copy of config with this layout."""
        config = config.copy_and_resolve_references()
        config.mesh.shape = tuple(int(s) for s in self.mesh_shape)
        config.model.remat = self.remat
        config.train.grad_accum_steps = int(self.grad_accum_steps)
        config.model.scan_layers = bool(self.scan_layers)
        return config


def device_memory_gib(device) -> float | None:
    """The memory a device gives XLA (GiB), or None where it has no limit to report (CPU,
    compile-only devices)."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - compile-only devices have no runtime
        return None
    limit = stats.get("bytes_limit")
    return limit / xla.GIB if limit else None


def _tensor_divisor(config) -> int:
    """The largest tensor-axis size the heads and MLP widths both divide (the rules shard those
    over 'tensor'; other sizes would replicate them)."""
    from fvdm_jax.models import model_from_config

    model = model_from_config(config.model)
    if isinstance(model, Wan):
        return math.gcd(int(model.num_heads), int(model.ffn_dim))
    mlp = int(model.hidden_size * model.mlp_ratio)
    return math.gcd(int(model.num_heads), mlp)


def _resolved_remat(config, platform: str) -> str:
    from fvdm_jax.models.dit import resolve_remat

    return resolve_remat(str(config.model.remat), platform)


def configured(config, devices) -> Layout:
    shape = shd.mesh_shape(config.mesh.shape, len(devices))
    return Layout(tuple(shape), _resolved_remat(config, devices[0].platform),
                  int(config.train.grad_accum_steps), bool(config.model.scan_layers))


def meshes(num_devices: int, micro_batch: int, tensor_divisor: int) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) using all devices with the micro-batch divisible by data x fsdp and
    tensor dividing the heads / MLP widths; least sharding first (tensor, then fsdp, ascending)."""
    out = []
    for t in range(1, num_devices + 1):
        if num_devices % t or tensor_divisor % t:
            continue
        for f in range(1, num_devices // t + 1):
            if (num_devices // t) % f:
                continue
            d = num_devices // (t * f)
            if micro_batch % (d * f) == 0:
                out.append((d, f, t))
    return out


def levels(config, num_devices: int) -> list[list[Layout]]:
    """The layouts to try, in levels: with scanned layers (micro-batches, then remat, in order of
    cost), then unrolled layers without micro-batches and with little remat (they can keep fewer
    temporaries than the scan but compile several times slower, so they come last); each level
    the meshes of `meshes` in order. Only 3-axis meshes (data, fsdp, tensor) are searched."""
    if len(tuple(config.mesh.axes)) != 3:
        raise ConfigError(f"config.mesh.fit needs the mesh axes (data, fsdp, tensor), not "
                          f"{tuple(config.mesh.axes)}; set config.mesh.fit=False")
    batch = int(config.train.batch_size)
    divisor = _tensor_divisor(config)
    out = []
    for scan in (True, False):
        for accum in GRAD_ACCUM if scan else (1,):
            grid = meshes(num_devices, batch // accum, divisor) if batch % accum == 0 else []
            for remat in RECOMPUTE if scan else UNROLLED_RECOMPUTE:
                if grid:
                    out.append([Layout(mesh, remat, accum, scan) for mesh in grid])
    return out


def valid(layout: Layout, config, num_devices: int) -> bool:
    batch, accum = int(config.train.batch_size), layout.grad_accum_steps
    data_fsdp = math.prod(layout.mesh_shape[:2]) if len(layout.mesh_shape) == 3 else 1
    return (math.prod(layout.mesh_shape) == num_devices and batch % accum == 0
            and (batch // accum) % data_fsdp == 0)


def abstract_batch(setup, config) -> dict:
    """ShapeDtypeStructs of one global batch with the batch shardings (as the latent cache gives;
    a Wan model's: model.wan.latent_size latents and data.text_length (None = Wan's 512) text
    tokens)."""
    model, b = setup.model, int(config.train.batch_size)
    shardings = setup.batch_shardings
    if isinstance(model, Wan):
        h, w = (int(v) for v in config.model.wan.latent_size)
        shape = (b, int(config.model.num_frames), h, w, model.in_channels)
        text = int(config.data.get("text_length") or WAN_TEXT_LENGTH)
        extra = {"context": jax.ShapeDtypeStruct((b, text, model.text_dim), np.float32,
                                                 sharding=shardings["context"]),
                 "context_mask": jax.ShapeDtypeStruct((b, text), np.bool_,
                                                      sharding=shardings["context_mask"])}
    else:
        shape = (b, model.num_frames, model.input_size, model.input_size, model.in_channels)
        extra = {}
    return {
        "video": jax.ShapeDtypeStruct(shape, np.float32, sharding=shardings["video"]),
        "label": jax.ShapeDtypeStruct((b,), np.int32, sharding=shardings["label"]),
        **extra,
    }


def lower_train_step(config, devices):
    """(setup, lowered): the real jitted train step of `config` (shardings, donation) lowered on
    abstract state for `devices`; nothing is allocated."""
    from fvdm_jax.training.setup import build_setup
    from fvdm_jax.training.step import JittedTrainStep

    setup = build_setup(config, devices=devices)
    step = JittedTrainStep(setup.model, setup.schedule, setup.optimizer, config.train, config.ptss,
                           setup.state_shardings, setup.batch_shardings, mesh=setup.mesh,
                           rules=setup.rules)
    return setup, step.lower(setup.abstract_state, abstract_batch(setup, config))


def measure_layout(config, layout: Layout, devices, hbm_gib, where: str,
                   compiler_options: dict | None = None) -> dict:
    """The compile record of the train step with `layout` (fits or not)."""
    setup, lowered = lower_train_step(layout.apply(config), devices)
    record, _ = xla.measure(lowered, "train_step", where, hbm_gib, compiler_options)
    record.update(layout=dict(dataclasses.asdict(layout), mesh_shape=list(layout.mesh_shape)),
                  flags=layout.flags(),
                  mesh=dict(setup.mesh.shape))
    return record


def first_fit(config, devices, hbm_gib: float | None, where: str,
              compiler_options: dict | None = None) -> tuple[Layout, list[dict]]:
    """The configured layout if it fits, else the first that does (module docstring); and the
    records of the layouts compiled on the way. ConfigError when none fits."""
    num = len(devices)
    mine = configured(config, devices)
    order = [mine] if valid(mine, config, num) else []
    order += [layout for level in levels(config, num) for layout in level if layout != mine]
    if not order:
        raise ConfigError(f"no layout of {num} devices divides train.batch_size="
                          f"{config.train.batch_size}; change the batch size")
    if hbm_gib is None:  # a CPU: no memory to exceed; only the mesh changes
        same = [layout for layout in order if (layout.remat, layout.grad_accum_steps, layout.scan_layers)
                == (mine.remat, mine.grad_accum_steps, mine.scan_layers)]
        return (same or order)[0], []
    tried = []
    for layout in order:
        record = measure_layout(config, layout, devices, hbm_gib, where, compiler_options)
        tried.append(record)
        if record["fits"]:
            return layout, tried
        logging.info("layout %s does not fit: %s", layout.flags(), record.get("error"))
    best = min(tried, key=lambda r: r.get("need_gib", math.inf))
    raise ConfigError(f"no layout of the train step fits {where}: the smallest, {best['flags']}, "
                      f"needs {best['need_gib']:.2f} GiB; lower train.batch_size, use "
                      f"model.dtype=bfloat16 or more devices")


def search(config, devices, hbm_gib: float | None, where: str,
           compiler_options: dict | None = None) -> tuple[dict | None, list[dict]]:
    """Breadth-first over `levels`: every mesh of a level compiled; the first level with a fit
    gives the fitting record with the fewest collective bytes. Returns (best or None, all)."""
    tried = []
    for level in levels(config, len(devices)):
        records = [measure_layout(config, layout, devices, hbm_gib, where, compiler_options)
                   for layout in level]
        tried += records
        fits = [r for r in records if r["fits"]]
        if fits:
            return min(fits, key=xla.collective_bytes), tried
    return None, tried


def resolve(config, devices=None):
    """config.mesh.fit: (config with the first layout that fits these devices, the layout's one-
    line description); unchanged config and None when config.mesh.fit is off."""
    if not bool(config.mesh.get("fit", False)):
        return config, None
    devices = list(jax.devices() if devices is None else devices)
    where = f"{len(devices)} x {devices[0].device_kind}"
    layout, tried = first_fit(config, devices, device_memory_gib(devices[0]), where)
    how = ("the configured layout" if layout == configured(config, devices)
           else f"first fit of {len(tried)} compiled" if tried else "first whose mesh divides the batch")
    return layout.apply(config), f"{layout.describe(config.mesh.axes)} ({how})"
