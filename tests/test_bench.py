"""Smoke tests: every bench script runs with tiny settings and prints its JSON lines.

Each script runs as a subprocess with XLA at -O0 (the timings do not matter here) and with
tensorflow, clu, grain and tensorflow_datasets made unimportable: accelerator images lack them,
and the benchmarks must not need them. Benchmark figures live in docs/benchmarks.md, never here.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Shared by the subprocesses of this session: programs compiled by one script (the train-state
# init, a train step with the same switches, matmuls) are cache hits in the next.
CACHE = tempfile.mkdtemp(prefix="fvdm_bench_test_cache_")
# The switches of the train_throughput smoke test; train_ab's variant repeats them (cache hit).
SWITCHES = ("--remat=dots", "--no_donate", "--unroll", "--attention=auto")

# Absent on the GPU machines: no bench script may import them, even indirectly.
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "grain", "torch")
# matmul_peak.py needs nothing but jax and numpy.
BLOCKED_FOR_MATMUL = BLOCKED + ("flax", "optax", "orbax", "ml_collections", "einops", "fvdm_jax")


def run_bench(script, *args, blocked=BLOCKED, devices=1):
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        # A smoke test only: compile fast (LLVM -O0).
        "XLA_FLAGS": f"--xla_backend_optimization_level=0 "
        f"--xla_force_host_platform_device_count={devices}",
        "JAX_COMPILATION_CACHE_DIR": CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    path = os.path.join(ROOT, "bench", script)
    # Every import finder is wrapped so that the blocked packages look not installed: `import`
    # raises ModuleNotFoundError and importlib.util.find_spec returns None, as on a machine
    # without them (sys.modules[name] = None would not do: einops, for one, probes
    # `name in sys.modules`, and jax's compilation cache probes find_spec).
    code = (
        "import sys, runpy\n"
        f"BLOCKED = {tuple(blocked)!r}\n"
        "class Hide:\n"
        "    def __init__(self, finder):\n"
        "        self.finder = finder\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        find = getattr(self.finder, 'find_spec', None)\n"
        "        if find is None or name.split('.')[0] in BLOCKED:\n"
        "            return None\n"
        "        return find(name, path, target)\n"
        "    def __getattr__(self, attr):\n"
        "        return getattr(self.finder, attr)\n"
        "sys.meta_path[:] = [Hide(f) for f in sys.meta_path]\n"
        f"sys.argv = {[path, *args]!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout
    for line in lines:
        assert line["jax"] and "cpu" in line["device"] and line["platform"] == "cpu"
        assert line["command"].startswith("JAX_PLATFORMS=cpu") and script in line["command"]
        assert "load_avg_before" in line and "load_avg_after" in line
    return lines


def test_encode_throughput_smoke():
    (line,) = run_bench(
        "encode_throughput.py", "--image_size=16", "--frames=1", "--per_device_batch=1",
        "--block_out_channels=8,8", "--layers_per_block=1",
    )
    assert line["bench"] == "encode_throughput" and line["frames_per_s"] > 0
    assert line["image_size"] == 16 and line["seconds_per_video"] > 0
    assert line["block_out_channels"] == [8, 8]


@pytest.mark.slow  # ~20 s on 2 cores: every switch of the benchmark script
def test_train_throughput_smoke_with_every_switch():
    (line,) = run_bench(
        "train_throughput.py", "--config=configs/tiny.py", "--steps=1", "--mesh=1,1,1",
        *SWITCHES, "--measure_matmul", "--matmul_sizes=64",
    )
    assert line["bench"] == "train_throughput" and line["step_s"] > 0 and line["compile_s"] > 0
    assert line["videos_per_s"] > 0 and line["train_flops_per_video"] > 0
    assert line["train_flops_per_video"] == 3 * line["forward_flops_per_video"]
    assert line["official_per_token_adaln_forward_flops"] > line["forward_flops_per_video"]
    model = line["model"]
    assert (model["remat"], model["attention"]) == ("dots", "auto")
    assert model["scan_layers"] is False and line["donate_state"] is False
    assert line["matmul"]["dtype"] == "float32" and line["matmul_flops_per_s"] > 0
    assert 0 < line["model_flops_over_matmul"]
    assert line["memory_plan"]["temp_bytes"] > 0
    assert line["loss"] == line["loss"]  # finite enough to compare: not NaN


@pytest.mark.slow  # ~15 s: the throughput smoke test above keeps the script in the default suite
def test_train_throughput_compile_only_on_8_devices():
    (line,) = run_bench(
        "train_throughput.py", "--config=configs/tiny.py", "--compile_only", "--mesh=-1,1,1",
        "--batch_size=8", "--dtype=float32", "--param_dtype=float32", devices=8,
    )
    assert line["compile_only"] is True and line["devices"] == 8 and line["batch"] == 8
    assert (line["model"]["dtype"], line["model"]["param_dtype"]) == ("float32", "float32")
    assert line["compile_s"] > 0 and line["lower_s"] > 0 and "step_s" not in line
    assert line["model"]["scan_layers"] is True and line["donate_state"] is True
    assert line["memory_plan"]["argument_bytes"] > 0


@pytest.mark.slow  # ~15 s on 2 cores: a benchmark's own smoke test
def test_train_ab_smoke_alternates_variants():
    lines = run_bench(
        "train_ab.py", "--config=configs/tiny.py", "--mesh=1,1,1", "--rounds=1",
        "--variant=" + " ".join(SWITCHES),
    )
    assert [row["variant"] for row in lines] == ["base", " ".join(SWITCHES)]
    base, variant = lines
    assert base["step_time_vs_base"] == 1.0 and variant["step_time_vs_base"] > 0
    assert base["donate_state"] is True and variant["donate_state"] is False
    assert (base["model"]["remat"], variant["model"]["remat"]) == ("auto", "dots")
    assert base["model"]["scan_layers"] is True and variant["model"]["scan_layers"] is False
    assert base["memory_plan"]["alias_bytes"] > 0 == variant["memory_plan"]["alias_bytes"]
    assert len(variant["step_times_s"]) == 1 and variant["compile_s"] > 0


def test_sample_latency_smoke_with_guidance():
    (line,) = run_bench(
        "sample_latency.py", "--config=configs/tiny.py", "--num_steps=2", "--batch_size=2",
        "--set", "model.num_classes=3", "--cfg_scale=1.5", "--repeats=1",
        "--matmul_peak=1e10",
    )
    assert line["bench"] == "sample_latency" and line["finite"] is True
    assert line["seconds_per_batch"] > 0 and line["compile_s"] > 0
    assert abs(line["seconds_per_video"] - line["seconds_per_batch"] / 2) <= 1e-5
    # DDIM-2 with guidance: 2 steps x 2 model rows per video.
    assert line["dit_flops_per_video"] == 2 * 2 * line["forward_flops_per_video"]
    assert line["model_flops_over_matmul"] > 0


def test_matmul_peak_smoke_needs_only_jax():
    lines = run_bench(
        "matmul_peak.py", "--sizes=32,64", "--dtypes=float32,bfloat16", "--repeats=1",
        blocked=BLOCKED_FOR_MATMUL,
    )
    assert [(row["dtype"], row["result"]) for row in lines] == [
        ("float32", "size"), ("float32", "size"), ("float32", "best"),
        ("bfloat16", "size"), ("bfloat16", "size"), ("bfloat16", "best"),
    ]
    best = lines[2]
    assert best["flops_per_s"] == max(row["flops_per_s"] for row in lines[:2]) > 0


def test_flops_table_reports_the_per_frame_adaln_saving():
    lines = run_bench("flops_table.py")
    xl = {row["size"]: row for row in lines}["XL"]
    assert f"{xl['forward_flops_per_video'] / 1e12:.3g}" == "3.73"
    assert f"{xl['train_flops_per_video'] / 1e12:.3g}" == "11.2"
    assert round(xl["per_frame_adaln_saving_flops"] / 1e12, 3) == 0.910
    assert round(xl["per_frame_adaln_saving_percent_of_forward"], 1) == 24.4


@pytest.mark.slow  # seven bench subprocesses: 1-3 minutes on 2 cores
def test_device_suite_tiny_runs_every_stage_and_writes_the_table(tmp_path):
    (summary,) = [line for line in run_bench("device_suite.py", "--tiny", f"--out={tmp_path}")
                  if line.get("bench") == "device_suite"]
    assert summary["ok"] == summary["stages"] == 7
    report = json.loads((tmp_path / "device_suite.json").read_text())
    benches = {r["bench"] for r in report["records"]}
    assert benches == {"matmul_peak", "train_throughput", "train_ab", "sample_latency",
                       "encode_throughput"}
    assert all(s["status"] == "ok" for s in report["stages"])
    table = (tmp_path / "device_suite.md").read_text()
    assert "| train A/B XL |" in table and "videos/s" in table and "frames/s" in table
    # One row per measured record (matmul: the best size per dtype only) plus the stage list.
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 2 + 3 + 2 + 1 + 1


def test_profile_step_attributes_the_traced_step_by_kind_of_work():
    (line,) = run_bench("profile_step.py", "--config=configs/tiny.py", "--mesh=1,1,1",
                        "--profile_steps=1", "--top=5")
    assert line["bench"] == "profile_step" and line["step_wall_s"] > 0
    share = line["share"]
    assert abs(sum(share.values()) - 1) < 1e-3
    # A train step multiplies matrices, runs an optimizer and draws PTSS timesteps and noise.
    assert share["matmul"] > 0 and share["optimizer"] > 0 and share["rng"] > 0
    # Nearly every executed operation was found in the compiled HLO.
    assert line["unmatched_op_seconds_per_step"] <= 0.2 * line["op_seconds_per_step"]
    assert len(line["top"]) == 5 and all(row["kind"] in share for row in line["top"])


def test_preemption_sync_smoke_times_the_vote_on_8_devices():
    lines = run_bench("preemption_sync.py", "--processes=1", "--steps=10", "--repeats=1", "--votes=3",
                      "--size=8", devices=8)
    by_result = {line["result"]: line for line in lines}
    assert by_result["vote"]["devices"] == 8 and by_result["vote"]["vote_roundtrip_us"] > 0
    assert by_result["loop"]["every_10_step_s"] > 0 and "every_1_overhead_us_per_step" in by_result["loop"]
