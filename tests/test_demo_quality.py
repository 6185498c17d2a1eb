"""The README's first command as a user runs it: the demo trains, then its verdict must show a
model that makes video (slow: about 15 minutes on 2 CPU cores; run with -m slow)."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUDGET_S = 12 * 60  # on a machine whose fp32 2048^3 jax matmul runs at REFERENCE_RATE
REFERENCE_RATE = 270e9


def matmul_rate() -> float:
    """This machine's fp32 matmul FLOP/s (bench/matmul_peak.py at size 2048), in a subprocess."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "matmul_peak.py"), "--sizes=2048",
                          "--dtypes=float32"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return max(line["flops_per_s"] for line in lines if "flops_per_s" in line)


@pytest.mark.slow
def test_the_demo_learns_video(tmp_path):
    rate = matmul_rate()
    workdir = str(tmp_path / "demo")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, full optimization
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fvdm_jax.main", "--config=configs/demo.py",
                             f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=3600)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    budget = BUDGET_S * max(1.0, REFERENCE_RATE / rate)
    assert elapsed <= budget, f"the demo took {elapsed:.0f} s; budget {budget:.0f} s at {rate / 1e9:.0f} GFLOP/s"

    rows = [json.loads(line) for line in open(os.path.join(workdir, "eval.jsonl"))]
    fvd = {(r["baseline_name"] if r.get("baseline") else r["task"]): r["fvd"] for r in rows if r.get("verdict")}
    assert fvd["generate"] < 0.5 * fvd["noise"], fvd
    assert fvd["i2v"] < fvd["generate"] and fvd["interpolate"] < fvd["generate"], fvd
    assert "baseline: shuffled" in result.stdout and "fvdm_jax train: done" in result.stdout
    for name in ("plots/loss.png", "verdict/generate.png", "verdict/i2v.png", "verdict/interpolate.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 1000, name
