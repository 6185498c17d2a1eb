"""Compile targets without their hardware: a TPU slice by its Cloud name (v5e-16, v5p-128,
v5e:4x4, several slices) as libtpu's topology description gives its devices, or NVIDIA GPUs
(h100-8, h200-16) through jax's CUDA plugin and a target description; per-chip memory of each.
--mode=compile (fvdm_jax/jobs/compile.py) compiles the project's programs for these devices."""

from __future__ import annotations

import dataclasses
import math
import os
import re

from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime.compiled import one_line

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
NAME_HELP = ("give a slice such as v5e-16, v6e-256 (chips), v4-8, v5p-128 (TensorCores) or "
             "v5e:4x4, v5p:4x4x4, or GPUs h100-8, h200-16 (8 per host)")

# NVIDIA GPUs the CUDA compiler targets without a GPU (the jax CUDA PJRT plugin and a target
# description; XLA:GPU reports memory but does not refuse a program that exceeds it). Hopper
# SXM: 132 SMs, 228 KiB shared memory per SM, 50 MiB L2 (NVIDIA's H100 / H200 datasheets).
GPUS = {
    "h100": {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 84942979072,
             "bandwidth": 3352320000000, "mem_clock_khz": 2619000},
    "h200": {"name": "NVIDIA H200 141GB HBM3e", "memory_bytes": 151397597184,
             "bandwidth": 4800000000000, "mem_clock_khz": 3750000},
}
GPUS_PER_HOST = 8
# JAX preallocates this fraction of GPU memory for XLA's buffers (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_MEM_FRACTION = 0.75
CUDA_PLUGIN = ("pip install --no-deps jax-cuda12-plugin==<jax's version> "
               "jax-cuda12-pjrt==<jax's version> (the CUDA compiler, ~480 MB; no GPU needed)")


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice as libtpu names it (generation, 'v5e:4x4', chips per slice, HBM per chip), or
    GPUs (generation 'h100', topology '1x<hosts>x<per host>', the memory XLA may use)."""

    name: str  # as the user gave it
    generation: str
    topology: str  # libtpu's form, e.g. 'v5e:4x4'
    shape: tuple[int, ...]
    num_slices: int
    hbm_gib: float

    @property
    def platform(self) -> str:
        return "gpu" if self.generation in GPUS else "tpu"

    @property
    def compiler_options(self) -> dict | None:
        """XLA options of this target's compiles: GPUs without a GPU use cuBLAS for the matmuls
        (this XLA's device-less Triton GEMM tiling fails on the XL step: "Couldn't find output
        tile sizes"); the memory plan is otherwise the same program's."""
        return {"xla_gpu_enable_triton_gemm": False} if self.platform == "gpu" else None

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
    gpu = re.fullmatch(r"(h100|h200)-(\d+)", text)
    if gpu:
        return _gpu_target(str(name), gpu.group(1), int(gpu.group(2)), int(num_slices))
    match = re.fullmatch(r"(v\d+[a-z]*)(?:([-:])(.+))?", text)
    generation = match and ALIASES.get(match.group(1), match.group(1))
    if not match or generation not in GENERATIONS or not match.group(3):
        raise ConfigError(f"config.compile.topology={name!r} is not a TPU slice or GPU I know: {NAME_HELP}")
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


def _gpu_target(name: str, generation: str, count: int, num_slices: int) -> Target:
    if num_slices != 1:
        raise ConfigError(f"config.compile.num_slices={num_slices}: GPUs have no slices; give "
                          f"the GPU count, e.g. {generation}-32 (4 hosts of 8)")
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise ConfigError(f"config.compile.topology={name!r}: up to {GPUS_PER_HOST} GPUs on one "
                          f"host or a multiple of {GPUS_PER_HOST}; {NAME_HELP}")
    hosts, per_host = max(1, count // GPUS_PER_HOST), min(count, GPUS_PER_HOST)
    usable = GPUS[generation]["memory_bytes"] * GPU_MEM_FRACTION / 1024**3
    return Target(name, generation, f"1x{hosts}x{per_host}", (hosts, per_host), 1, round(usable, 3))


def gpu_target_config(generation: str) -> str:
    """The CUDA compiler's description of a GPU (a GpuTargetConfigProto in text form)."""
    spec = GPUS[generation]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {spec['bandwidth']} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {spec['memory_bytes']} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{spec['name']}"
"""


def _gpu_devices(target: Target) -> list:
    import importlib.util

    from jax.experimental import topologies

    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise ConfigError(f"--mode=compile for {target.name} needs jax's CUDA plugin: {CUDA_PLUGIN}")
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology_name="", topology=target.topology,
            target_config=gpu_target_config(target.generation))
    except Exception as error:  # noqa: BLE001 - the plugin's own message, on one line
        raise ConfigError(f"config.compile.topology={target.name!r}: {one_line(error)}") from None
    return list(topology.devices)


def target_devices(target: Target) -> list:
    """The compile-only devices of the target slice(s) (libtpu) or GPUs (jax's CUDA plugin);
    nothing runs on them."""
    from jax._src.cloud_tpu_init import get_tpu_library_path

    if target.platform == "gpu":
        return _gpu_devices(target)
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
                          f"{one_line(error)}") from None
    return list(topology.devices)


# ---- the programs ----------------------------------------------------------------------------
