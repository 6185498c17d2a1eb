"""Shared helpers of the bench scripts: the record every JSON line carries, timing, matmul peak.

Imports only jax and numpy (no tensorflow, clu, grain or ml_collections), so that matmul_peak.py
runs on a bare accelerator image. Every bench script puts the repository root on sys.path, so
`python bench/SCRIPT.py ...` works from a fresh checkout without `pip install -e .`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description() -> str:
    """e.g. '8 x NVIDIA H100 80GB HBM3' or '1 x cpu (AMD EPYC, 2 cores)'."""
    devices = jax.devices()
    kind = devices[0].device_kind
    text = f"{len(devices)} x {kind}"
    if devices[0].platform == "cpu":
        text += f" ({_cpu_model()}, {os.cpu_count()} cores)"
    return text


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def record(bench: str, **fields) -> dict:
    """The common fields of every JSON line, then the bench's own."""
    return {
        "bench": bench,
        "device": device_description(),
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **fields,
    }


def emit(line: dict, load_before: list[float] | None = None) -> None:
    """Prints one JSON line, adding the load average (before and after the measurement: on a
    shared machine the timings are upper bounds) and the exact command."""
    line = dict(line)
    line["load_avg_before"] = load_before
    line["load_avg_after"] = load_average()
    line["command"] = shlex.join(
        [k + "=" + os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS") if os.environ.get(k)]
        + ["python", os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "-", *sys.argv[1:]]
    )
    print(json.dumps(line), flush=True)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn(), each synchronized with block_until_ready."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return times


def memory_analysis(compiled) -> dict | None:
    """XLA's static memory plan of a compiled program (all backends, CPU included), in bytes."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend/version implements it
        return None
    if stats is None:
        return None
    if isinstance(stats, (list, tuple)):
        stats = stats[0]
    keys = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {k.replace("_size_in_bytes", "_bytes"): getattr(stats, k, None) for k in keys}
    return {k: int(v) for k, v in out.items() if v is not None}


def peak_memory_bytes() -> int | None:
    """The runtime peak of the devices that report one (GPU/TPU; None on CPU)."""
    peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001
            stats = {}
        if stats.get("peak_bytes_in_use") is not None:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) if peaks else None


def default_matmul_sizes() -> tuple[int, ...]:
    return (512, 1024, 2048, 3072) if jax.default_backend() == "cpu" else (4096, 8192, 16384)


def matmul_rate(size: int, dtype: str, *, repeats: int = 3, min_seconds: float = 0.2,
                device=None) -> dict:
    """Best achieved FLOP/s of a jitted (size x size) @ (size x size) matmul in `dtype`
    (float32 accumulation for half precision inputs), on one device."""
    device = device or jax.devices()[0]
    dt = DTYPES[dtype]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (size, size), jnp.float32).astype(dt), device)
    b = jax.device_put(jax.random.normal(key_b, (size, size), jnp.float32).astype(dt), device)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dt))
    started = time.perf_counter()
    jax.block_until_ready(matmul(a, b))  # compile + first run
    first = time.perf_counter() - started
    del first
    # Enough calls per timing that dispatch overhead does not count (GPUs run ~1 ms matmuls).
    once = min(timed(lambda: matmul(a, b), 2))
    calls = max(1, int(min_seconds / max(once, 1e-6)))

    def many():
        out = None
        for _ in range(calls):
            out = matmul(a, b)
        return out

    best = min(timed(many, repeats)) / calls
    flops = 2.0 * size**3
    return {"size": size, "dtype": dtype, "seconds": best, "flops_per_s": flops / best}


def matmul_peak(dtype: str, sizes: Sequence[int] | None = None, repeats: int = 3) -> dict:
    """The machine's own achievable matmul rate: the best over `sizes` of matmul_rate."""
    results = [matmul_rate(s, dtype, repeats=repeats) for s in (sizes or default_matmul_sizes())]
    best = max(results, key=lambda r: r["flops_per_s"])
    return {"dtype": dtype, "flops_per_s": best["flops_per_s"], "best_size": best["size"],
            "by_size": {str(r["size"]): r["flops_per_s"] for r in results}}


def parse_sizes(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(s) for s in text.split(",")) if text else None


def vendor_peak(kind: str | None = None) -> float | None:
    """The vendor's dense bf16 matmul peak of this device kind (fvdm_jax.training.flops's table), or
    None (CPUs: measure the machine's own rate with matmul_peak instead)."""
    from fvdm_jax.training.flops import peak_flops_per_device

    return peak_flops_per_device(kind or jax.devices()[0].device_kind)


def block_modules(names: Sequence[str]) -> None:
    """Makes `import NAME` fail for each name (checks that a script needs none of them)."""
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values)))
