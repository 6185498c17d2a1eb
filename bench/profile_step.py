"""Where the train step's time goes: a jax.profiler trace of the real step, by kind of work.

    python bench/profile_step.py --config=configs/ffs_xl.py --size=S --batch_size=1 \\
        [--profile_steps=2] [--top=15] [any flag of bench/train_throughput.py]

Compiles the real jitted train step (bench/train_throughput.py's flags), runs one warm-up step,
then traces --profile_steps steps with jax.profiler (a Perfetto trace) and attributes every
executed XLA operation (each thunk of the trace is one instruction of the compiled HLO) to a kind
of work, by its opcode and the JAX name-stack in its HLO metadata:

  matmul          dot / convolution and the fusions built around one (XLA:CPU's YNNPACK and oneDNN
                  fusions included), forward and backward
  attention       the non-matmul work inside attention (scale, softmax, masks)
  norm            layer norms and other reductions inside the model
  modulate        adaLN shift/scale/gate arithmetic and the timestep/label embedders
  layout          transposes, copies and pads (the reshapes around spatial/temporal attention)
  scan            the layer scan's own work: slicing each layer's weights and saved activations
                  out of the stacked arrays and writing gradients back (dynamic-(update-)slice)
  elementwise     the rest of the model (GELU, residual adds, patch embed glue)
  loss            the diffusion loss (q_sample, targets, MSE, VB)
  optimizer       AdamW, the gradient norm and clip, the EMA update (outside the model)
  rng             PTSS timesteps, the noise, label dropout (threefry)
Container instructions (while, conditional, call) are not counted (their bodies are). Prints one
JSON line: the step's wall time, the summed operation time, the share of each kind, and the
--top single operations. XLA:CPU may run independent operations on several threads, so the
summed time can exceed the wall time; shares are of the summed time.
Needs what bench/train_throughput.py needs; no tensorflow, clu or grain.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench import benchlib  # noqa: E402

KINDS = ("matmul", "attention", "norm", "modulate", "layout", "scan", "elementwise", "loss",
         "optimizer", "rng")
CONTAINERS = {"while", "conditional", "call", "tuple", "get-tuple-element", "parameter",
              "constant", "bitcast"}
# `%name = TYPE opcode(`: TYPE is one shape with its layout, or a tuple of them in parentheses.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+?(?:\{[^}]*\})?)\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_RNG = ("threefry", "_normal", "_randint", "_uniform", "random_bits", "random_split")
_MODULATE = ("adaLN", "adaln", "modulat", "t_embedder", "y_embedder", "timestep", "label_embed")


_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def instructions(hlo_text: str) -> dict[str, tuple[str, str, bool]]:
    """name -> (opcode, op_name of its metadata, whether it is or fuses a dot/convolution)."""
    computations, lines, current = {}, [], None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and " = " not in stripped.split("(")[0]:
            current = stripped.split()[0].lstrip("%")
            if current == "ENTRY":
                current = stripped.split()[1].lstrip("%")
            computations[current] = []
        elif current is not None:
            computations[current].append(stripped)
        lines.append(line)
    has_dot = {name: any(re.search(r"\s(dot|convolution)\(", x) for x in body)
               for name, body in computations.items()}
    table = {}
    for line in lines:
        match = _INSTRUCTION.match(line)
        if match:
            opcode = match.group(2)
            op_name = _OP_NAME.search(line)
            calls = _CALLS.search(line)
            dot = opcode in ("dot", "convolution") or (
                opcode == "fusion" and bool(calls) and has_dot.get(calls.group(1), False))
            table[match.group(1)] = (opcode, op_name.group(1) if op_name else "", dot)
    return table


def kind_of(name: str, opcode: str, op_name: str, dot: bool) -> str | None:
    """The kind of work of one instruction (None: a container, not counted)."""
    if opcode in CONTAINERS:
        return None
    path = op_name.lower()
    if any(r in path for r in _RNG):
        return "rng"
    if dot or (opcode == "custom-call" and "matmul" in name.lower()):
        return "matmul"
    if "index_in_dim" in path or (("/while/body/" in path or path.endswith("/while/body"))
                                  and "closed_call" not in path
                                  and ("dynamic" in name or "dynamic" in path)):
        return "scan"
    if opcode in ("transpose", "copy", "pad") or re.search(r"(^|_)(copy|transpose|pad)(_|\.|$)", name):
        return "layout"
    if "dit" not in path:
        return "loss" if any(k in path for k in ("loss", "q_sample", "vb", "mse")) else "optimizer"
    if any(k in op_name for k in _MODULATE):
        return "modulate"
    if "attn" in path or "attention" in path or "softmax" in path:
        return "attention"
    if "norm" in path or opcode == "reduce" or "reduce" in name:
        return "norm"
    return "elementwise"


def trace_events(trace_dir: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True))
    if not files:
        raise SystemExit(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def breakdown(events: list[dict], table: dict) -> tuple[dict, collections.Counter, float]:
    """Seconds by kind, by operation, and the seconds of operation-like events not in the HLO
    (the parse's blind spot: it should stay near 0)."""
    by_kind = dict.fromkeys(KINDS, 0.0)
    by_op = collections.Counter()
    unmatched = 0.0
    for event in events:
        if event.get("ph") != "X":
            continue
        name = event.get("name", "")
        if name not in table:
            if re.fullmatch(r"[a-z][\w\-]*\.?\d*", name) and not name.startswith("end"):
                unmatched += event.get("dur", 0.0) * 1e-6
            continue
        kind = kind_of(name, *table[name])
        if kind is None:
            continue
        seconds = event.get("dur", 0.0) * 1e-6
        by_kind[kind] += seconds
        by_op[(name, kind, table[name][1])] += seconds
    return by_kind, by_op, unmatched


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile_steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    ours, rest = parser.parse_known_args(argv)
    from bench.train_ab import Variant

    load_before = benchlib.load_average()
    variant = Variant("profile", rest)  # compiles, initializes, runs the warm-up step
    hlo = variant.compiled.as_text()
    table = instructions(hlo)
    trace_dir = tempfile.mkdtemp(prefix="fvdm_profile_")
    with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:
        f.write(hlo)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        started = time.perf_counter()
        for _ in range(ours.profile_steps):
            variant.step()
        wall = (time.perf_counter() - started) / ours.profile_steps
    by_kind, by_op, unmatched = breakdown(trace_events(trace_dir), table)
    total = sum(by_kind.values())
    steps = ours.profile_steps
    model = variant.config.model
    benchlib.emit(benchlib.record(
        "profile_step",
        config=variant.args.config,
        model={k: model[k] for k in ("size", "patch_size", "num_frames", "input_size", "dtype",
                                     "remat", "attention", "scan_layers")},
        batch=variant.batch_size,
        profiled_steps=steps,
        step_wall_s=round(wall, 5),
        op_seconds_per_step=round(total / steps, 5),
        unmatched_op_seconds_per_step=round(unmatched / steps, 5),
        share={k: round(v / total, 4) if total else 0.0 for k, v in by_kind.items()},
        seconds_per_step={k: round(v / steps, 5) for k, v in by_kind.items()},
        model_flops_per_s=variant.flops_per_step / wall,
        top=[dict(op=name, kind=kind, jax_name=op_name[-120:], seconds_per_step=round(s / steps, 5))
             for (name, kind, op_name), s in by_op.most_common(ours.top)],
        trace_dir=trace_dir,
    ), load_before)


if __name__ == "__main__":
    main()
