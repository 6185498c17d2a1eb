"""--mode=compile: compile the real train step for a named TPU slice on this (CPU) machine.

    python -m fvdm_jax.main --config=configs/ffs_xl.py --workdir=W --mode=compile \\
        --config.compile.topology=v5e-16 [--config.compile.num_slices=2]

As MaxText's train_compile: libtpu describes the target slice (`jax.experimental.topologies`,
compile-only devices, no TPU needed), the mesh and the abstract train state and batch get the
target's shardings (nothing is allocated), and the jitted train step (state donation and shardings
as in training) is lowered and compiled by the TPU compiler. Reported per program: XLA's per-chip
memory plan against the chip's HBM, the compile time, the collectives of the compiled HLO, and
whether it fits. A program that does not fit fails to compile in seconds (RESOURCE_EXHAUSTED): one
line with the need and the HBM, recorded with fits=false. Printed as a table and written to
WORKDIR/compile.json (a list, one record per program).

Topology names: `v5e-16` / `v6e-256` (chips), `v4-8` / `v5p-128` (TensorCores, 2 per chip, as
Cloud TPU accelerator types count them), or explicit `v5e:4x4`, `v5p:4x4x4`. model.remat=auto
and model.attention=auto resolve for the TPU, not for this machine's backend.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

from fvdm_jax.errors import ConfigError

GIB = 1024**3

# Per-chip HBM (GiB) and the chip config of each generation (v4 and v5p: one device per chip,
# the two TensorCores as one "megacore"). Cloud TPU docs: v4 32 GiB, v5e 16 GB, v5p 95 GB,
# v6e (Trillium) 32 GB.
GENERATIONS = {
    "v4": {"hbm_gib": 32.0, "dims": 3, "counts": "cores", "chip_config": "megacore"},
    "v5e": {"hbm_gib": 16.0, "dims": 2, "counts": "chips", "chip_config": "default"},
    "v5p": {"hbm_gib": 95.0, "dims": 3, "counts": "cores", "chip_config": "megacore"},
    "v6e": {"hbm_gib": 32.0, "dims": 2, "counts": "chips", "chip_config": "default"},
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
HOST_BOUNDS = (2, 2, 1)  # chips per host of a multi-host slice (4 per VM)
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
NAME_HELP = ("give a slice such as v5e-16, v6e-256 (chips), v4-8, v5p-128 (TensorCores) or "
             "v5e:4x4, v5p:4x4x4")


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice as libtpu names it: generation, 'v5e:4x4', chips per slice, HBM per chip."""

    name: str  # as the user gave it
    generation: str
    topology: str  # libtpu's form, e.g. 'v5e:4x4'
    shape: tuple[int, ...]
    num_slices: int
    hbm_gib: float

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices

    def host_bounds(self) -> tuple[int, int, int]:
        dims = tuple(self.shape) + (1,) * (3 - len(self.shape))
        return tuple(min(d, b) for d, b in zip(dims, HOST_BOUNDS))


def _shape_for_chips(chips: int, dims: int) -> tuple[int, ...] | None:
    """The standard slice shape of `chips` chips: v5e/v6e 2D (4x4, 8x16), v4/v5p 3D (4x4x8)."""
    if chips < 1 or chips & (chips - 1):
        return None
    e = chips.bit_length() - 1
    if dims == 2:
        return (2 ** (e // 2), 2 ** (e - e // 2))
    if chips == 4:
        return (2, 2, 1)
    if chips < 8:
        return None
    base, rem = divmod(e, 3)
    return (2**base, 2 ** (base + (rem >= 2)), 2 ** (base + (rem >= 1)))


def parse_topology(name: str, num_slices: int = 1) -> Target:
    """'v5e-16', 'v5p-128', 'v5e:4x4', ... -> Target; ConfigError (one line) for anything else."""
    text = str(name or "").strip().lower()
    if not text:
        raise ConfigError(f"--mode=compile needs config.compile.topology: {NAME_HELP}")
    if int(num_slices) < 1:
        raise ConfigError(f"config.compile.num_slices={num_slices} must be >= 1")
    match = re.fullmatch(r"(v\d+[a-z]*)(?:([-:])(.+))?", text)
    generation = match and ALIASES.get(match.group(1), match.group(1))
    if not match or generation not in GENERATIONS or not match.group(3):
        raise ConfigError(f"config.compile.topology={name!r} is not a TPU slice I know: {NAME_HELP}")
    spec = GENERATIONS[generation]
    if match.group(2) == ":":
        try:
            shape = tuple(int(s) for s in match.group(3).split("x"))
        except ValueError:
            shape = ()
        if len(shape) != spec["dims"] or min(shape, default=0) < 1:
            raise ConfigError(f"config.compile.topology={name!r}: a {generation} slice has "
                              f"{spec['dims']} dimensions, e.g. {generation}:{'x'.join(['4'] * spec['dims'])}")
    else:
        count = int(match.group(3)) if match.group(3).isdigit() else 0
        chips = count // 2 if spec["counts"] == "cores" else count
        shape = _shape_for_chips(chips, spec["dims"]) if count else None
        if shape is None or (spec["counts"] == "cores" and count % 2):
            raise ConfigError(f"config.compile.topology={name!r}: {generation}-N counts "
                              f"{spec['counts']} and N must be a power of two"
                              f"{' >= 8' if spec['counts'] == 'cores' else ''}; {NAME_HELP}")
    return Target(str(name), generation, f"{generation}:{'x'.join(map(str, shape))}", shape,
                  int(num_slices), spec["hbm_gib"])


def target_devices(target: Target) -> list:
    """The compile-only devices of the target slice(s), from libtpu; nothing runs on them."""
    from jax._src.cloud_tpu_init import get_tpu_library_path

    if get_tpu_library_path() is None:
        raise ConfigError('--mode=compile needs libtpu (the TPU compiler): pip install '
                          '-r requirements-compile.txt (libtpu, the version jax[tpu] pins)')
    # libtpu probes for a local TPU when it loads; on a machine without one, say so up front
    # instead of its warnings (set before the plugin loads; the target is given explicitly).
    # Compiling opens no TPU, so other processes holding libtpu's lockfile (/tmp/libtpu_lockfile:
    # any jax process without JAX_PLATFORMS=cpu, another compile) must not stop this one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    from jax.experimental import topologies

    kwargs = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
    try:
        topology = topologies.get_topology_desc(
            topology_name=target.topology, platform="tpu",
            chip_config_name=GENERATIONS[target.generation]["chip_config"],
            chips_per_host_bounds=target.host_bounds(), **kwargs)
    except Exception as error:  # noqa: BLE001 - libtpu's own message, on one line
        raise ConfigError(f"config.compile.topology={target.name!r} ({target.topology}): "
                          f"{_one_line(error)}") from None
    return list(topology.devices)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# ---- the compiled program: memory plan, collectives, out-of-memory message --------------------

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
          "u4": 0.5}
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")


def _shape_bytes(text: str) -> int:
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        size = 1 if dtype.startswith("f8") else _BYTES.get(dtype)
        if size is not None:
            total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def collectives(hlo_text: str) -> dict:
    """{kind: {'count', 'bytes'}} of the compiled (per-chip) HLO: each collective instruction
    once (one in the scanned layer loop runs once per layer), bytes its result per chip (for an
    async pair, the -done's result)."""
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        shape, kind, phase = match.groups()
        if phase != "-done":
            out[kind]["count"] += 1
        if phase != "-start":
            out[kind]["bytes"] += _shape_bytes(shape)
    return out


def memory_gib(compiled) -> tuple[dict, dict]:
    """XLA's per-chip plan in GiB: arguments, outputs, aliased (donated state), temporaries,
    generated code, and total = arguments + outputs - aliased + temporaries + code; and the same
    in bytes."""
    stats = compiled.memory_analysis()
    arg, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    code = stats.generated_code_size_in_bytes
    values = {"arguments": arg, "outputs": out, "aliased": alias, "temporaries": temp,
              "generated_code": code, "total": arg + out - alias + temp + code}
    return {k: round(v / GIB, 6) for k, v in values.items()}, values


_SIZE = r"([\d.]+)\s*([KMGT])i?B?"
_UNITS = {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 1024.0}


def out_of_memory(message: str) -> tuple[float, float] | None:
    """(needed GiB, available GiB) from XLA:TPU's RESOURCE_EXHAUSTED message, e.g. 'the total
    memory required for HLO temporaries (49.80G) exceeds available HBM (15.75G)' or 'Used 20.25G
    of 15.75G hbm'; None when the message is something else."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    for pattern in (rf"\({_SIZE}\)\s+exceeds available HBM\s+\({_SIZE}\)",
                    rf"Used\s+{_SIZE}\s+of\s+{_SIZE}"):
        match = re.search(pattern, message)
        if match:
            need, nu, have, hu = match.groups()
            return float(need) * _UNITS[nu], float(have) * _UNITS[hu]
    sizes = re.findall(rf"\b{_SIZE}", message)
    if len(sizes) >= 2:
        (need, nu), (have, hu) = sizes[0], sizes[1]
        return float(need) * _UNITS[nu], float(have) * _UNITS[hu]
    return None


# ---- the job -----------------------------------------------------------------------------------

def for_target(config, platform: str = "tpu"):
    """A copy of config with model.remat and model.attention 'auto' resolved for `platform`."""
    from fvdm_jax.models.dit import resolve_remat
    from fvdm_jax.models.layers import resolve_attention

    config = config.copy_and_resolve_references()
    config.model.remat = resolve_remat(str(config.model.remat), platform)
    config.model.attention = resolve_attention(
        str(config.model.attention), str(config.model.dtype), platform)
    return config


def _abstract_batch(setup, config):
    import jax
    import numpy as np

    model, b = setup.model, int(config.train.batch_size)
    shape = (b, model.num_frames, model.input_size, model.input_size, model.in_channels)
    return {
        "video": jax.ShapeDtypeStruct(shape, np.float32, sharding=setup.batch_shardings["video"]),
        "label": jax.ShapeDtypeStruct((b,), np.int32, sharding=setup.batch_shardings["label"]),
    }


def compile_train_step(config, target: Target, devices) -> dict:
    """The record of the train step compiled for `devices` (fits or not)."""
    from fvdm_jax.training.loop import build_setup
    from fvdm_jax.training.step import JittedTrainStep

    config = for_target(config)
    setup = build_setup(config, devices=devices)
    step = JittedTrainStep(setup.model, setup.schedule, setup.optimizer, config.train, config.ptss,
                           setup.state_shardings, setup.batch_shardings, mesh=setup.mesh,
                           rules=setup.rules)
    record = {
        "program": "train_step", "topology": target.name, "topology_name": target.topology,
        "num_slices": target.num_slices, "chips": target.chips,
        "device_kind": devices[0].device_kind, "mesh": dict(setup.mesh.shape),
        "hbm_gib_per_chip": target.hbm_gib, "batch_size": int(config.train.batch_size),
        "model": {k: config.model[k] for k in ("size", "hidden_size", "depth", "patch_size",
                                               "dtype", "remat", "attention", "scan_layers")},
    }
    started = time.perf_counter()
    lowered = step.lower(setup.abstract_state, _abstract_batch(setup, config))
    record["lower_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as error:  # noqa: BLE001 - only XLA's out-of-memory is a result
        sizes = out_of_memory(str(error))
        if sizes is None:
            raise
        need, have = sizes
        what = re.search(r"required for ([\w ]+?) \(", str(error))
        what = f" of {what.group(1)}" if what else " per chip"
        record.update(
            compile_s=round(time.perf_counter() - started, 3), fits=False,
            need_gib=round(need, 3), available_gib=round(have, 3),
            short_by_gib=round(need - have, 3), xla_message=_one_line(error)[:500],
            error=(f"train_step does not fit on {target.name} ({record['device_kind']}): it needs "
                   f"{need:.2f} GiB{what}, the chip has {have:.2f} GiB usable of "
                   f"{target.hbm_gib:g} GiB HBM; does not fit by {need - have:.2f} GiB"))
        return record
    record["compile_s"] = round(time.perf_counter() - started, 3)
    memory, memory_bytes = memory_gib(compiled)
    record.update(memory_gib=memory, memory_bytes=memory_bytes, fits=memory["total"] <= target.hbm_gib,
                  collectives=collectives(compiled.as_text()))
    if not record["fits"]:
        short = memory["total"] - target.hbm_gib
        record["short_by_gib"] = round(short, 3)
        record["error"] = (f"train_step does not fit on {target.name}: {memory['total']:.2f} GiB "
                           f"per chip of {target.hbm_gib:g} GiB HBM; does not fit by {short:.2f} GiB")
    return record


def report(records: list[dict]) -> str:
    """The table (one row per program) and a line for each program that does not fit."""
    head = (f"{'program':<12} {'topology':<14} {'chips':>5} {'args':>8} {'outputs':>8} "
            f"{'temps':>8} {'code':>7} {'total':>8} {'HBM':>6} {'compile_s':>9}  fits  collectives")
    lines = [head, "-" * len(head)]
    for r in records:
        name = r["topology"] + (f" x{r['num_slices']}" if r["num_slices"] > 1 else "")
        m = r.get("memory_gib")
        if m:
            sizes = (f"{m['arguments']:8.3f} {m['outputs']:8.3f} {m['temporaries']:8.3f} "
                     f"{m['generated_code']:7.3f} {m['total']:8.3f}")
        else:
            sizes = f"{'-':>8} {'-':>8} {'-':>8} {'-':>7} {r['need_gib']:8.3f}"
        coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / 2**20:.2f} MiB)"
                         for k, v in r.get("collectives", {}).items() if v["count"]) or "-"
        lines.append(f"{r['program']:<12} {name:<14} {r['chips']:>5} {sizes} "
                     f"{r['hbm_gib_per_chip']:6.1f} {r['compile_s']:9.2f}  "
                     f"{'yes' if r['fits'] else 'NO ':<4}  {coll}")
    lines.append("per-chip GiB (XLA's memory plan; total = args + outputs - donated + temps + code)")
    lines += [r["error"] for r in records if not r["fits"]]
    return "\n".join(lines)


def compile_job(config, workdir: str, devices=None) -> tuple[list[dict], str]:
    """Compiles the train step for config.compile.topology; writes WORKDIR/compile.json and
    returns (records, the printed report)."""
    from fvdm_jax.runtime import files

    section = config.get("compile") or {}
    target = parse_topology(section.get("topology", ""), int(section.get("num_slices", 1)))
    devices = target_devices(target) if devices is None else devices
    records = [compile_train_step(config, target, devices)]
    path = files.write_json(files.join(files.resolve(workdir), "compile.json"), records,
                            sort_keys=False)
    return records, report(records) + f"\nwritten to {path}"
