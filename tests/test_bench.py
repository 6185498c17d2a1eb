"""Smoke tests: every bench script runs with tiny settings and prints its JSON line."""

import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def run_bench(script, *args):
    # A smoke test only: compile fast (LLVM -O0), the timings themselves do not matter here.
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout
    return lines


def test_encode_throughput_smoke():
    (line,) = run_bench("encode_throughput.py", "--image_size=32", "--frames=1", "--per_device_batch=1")
    assert line["bench"] == "encode_throughput" and line["frames_per_s"] > 0
    assert line["image_size"] == 32 and "cpu" in line["device"]


def test_train_throughput_smoke():
    (line,) = run_bench("train_throughput.py", "--config=configs/tiny.py", "--steps=1", "--mesh=1,1,1")
    assert line["bench"] == "train_throughput" and line["step_s"] > 0 and line["compile_s"] > 0
    assert line["videos_per_s"] > 0 and line["train_flops_per_video"] > 0
