"""What a compiled XLA program needs per device: its memory plan, its collectives, and the
compiler's out-of-memory message read as numbers.

    compiled = jax.jit(f, in_shardings=..., out_shardings=...).lower(*abstract).compile()
    memory_gib(compiled)          # XLA's own per-device plan (arguments, temporaries, ...)
    collectives(compiled.as_text())

`measure(lowered, hbm_gib)` compiles and returns one record either way: a program that does not
fit (XLA:TPU fails it in seconds with RESOURCE_EXHAUSTED; on other backends its plan exceeds the
device memory) is a record with fits=False and the need, not an exception.
"""

from __future__ import annotations

import math
import re
import time

GIB = 1024**3
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
          "u4": 0.5}
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^%([\w.-]+) \(.*\) -> (.+) \{$")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type text, e.g. '(f32[8]{0}, bf16[4,4])' -> 64."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        size = 1 if dtype.startswith("f8") else _BYTES.get(dtype)
        if size is not None:
            total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def shape_dims(text: str) -> list[tuple[int, ...]]:
    """The dimensions of every array shape in an HLO type text: '(f32[8]{0}, bf16[4,4])' ->
    [(8,), (4, 4)]."""
    return [tuple(int(d) for d in dims.split(",") if d) for _, dims in _SHAPE.findall(text)]


def collective_ops(hlo_text: str):
    """(kind, phase, result shape text) of each collective instruction of compiled HLO text;
    phase is '', '-start' or '-done' (an async pair).

    XLA:TPU writes a reduce-scatter as a custom fusion whose computation is named
    `all-reduce-scatter*`: an all-reduce and a dynamic-slice of this chip's shard, run as one
    reduce-scatter. Its all-reduce is yielded as a reduce-scatter whose result is the shard (the
    computation's result), not as an all-reduce of the full tensor."""
    scatter_result = None  # the result of the all-reduce-scatter computation being read
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            name, result = header.groups()
            scatter_result = result if name.startswith("all-reduce-scatter") else None
            continue
        match = _OP.search(line)
        if match:
            shape, kind, phase = match.groups()
            if scatter_result is not None and kind == "all-reduce":
                kind, shape = "reduce-scatter", scatter_result
            yield kind, phase or "", shape


def collectives(hlo_text: str) -> dict:
    """{kind: {'count', 'bytes'}} of the compiled (per-device) HLO: each collective instruction
    once (one in the scanned layer loop runs once per layer), bytes its result per device (for
    an async pair, the -done's result)."""
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for kind, phase, shape in collective_ops(hlo_text):
        if phase != "-done":
            out[kind]["count"] += 1
        if phase != "-start":
            out[kind]["bytes"] += shape_bytes(shape)
    return out


def collective_bytes(record: dict) -> int:
    """All collective bytes of a measured record (0 when it has none)."""
    return sum(kind["bytes"] for kind in record.get("collectives", {}).values())


def memory_gib(compiled) -> tuple[dict, dict]:
    """XLA's per-device plan in GiB: arguments, outputs, aliased (donated state), temporaries,
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


def measure(lowered, program: str, where: str, hbm_gib: float | None,
            compiler_options: dict | None = None) -> tuple[dict, object]:
    """Compiles `lowered`; returns (record, compiled or None). The record: compile_s, fits and,
    when it compiled, memory_gib / memory_bytes / collectives; when it does not fit, need_gib,
    short_by_gib and `error`, one line naming the program, `where` (e.g. 'v5e-16 (TPU v5
    lite)'), the need and the memory. hbm_gib None (a CPU: no device memory to exceed) fits.
    compiler_options: XLA options for this compile (e.g. GPU targets without a GPU)."""
    started = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    except Exception as error:  # noqa: BLE001 - only XLA's out-of-memory is a result
        sizes = out_of_memory(str(error))
        if sizes is None:
            raise
        need, have = sizes
        what = re.search(r"required for ([\w ]+?) \(", str(error))
        what = f" of {what.group(1)}" if what else " per chip"
        total = f" of {hbm_gib:g} GiB HBM" if hbm_gib else ""
        record = {
            "compile_s": round(time.perf_counter() - started, 3), "fits": False,
            "need_gib": round(need, 3), "available_gib": round(have, 3),
            "short_by_gib": round(need - have, 3), "xla_message": one_line(error)[:500],
            "error": (f"{program} does not fit on {where}: it needs {need:.2f} GiB{what}, the chip "
                      f"has {have:.2f} GiB usable{total}; does not fit by {need - have:.2f} GiB")}
        return record, None
    record = {"compile_s": round(time.perf_counter() - started, 3)}
    memory, memory_bytes = memory_gib(compiled)
    fits = hbm_gib is None or memory["total"] <= hbm_gib
    record.update(memory_gib=memory, memory_bytes=memory_bytes, fits=fits,
                  collectives=collectives(compiled.as_text()))
    if not fits:
        short = memory["total"] - hbm_gib
        record.update(need_gib=round(memory["total"], 3), short_by_gib=round(short, 3),
                      error=(f"{program} does not fit on {where}: {memory['total']:.2f} GiB per "
                             f"chip of {hbm_gib:g} GiB HBM; does not fit by {short:.2f} GiB"))
    return record, compiled
