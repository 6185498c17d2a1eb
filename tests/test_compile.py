"""--mode=compile: the real train step compiled by libtpu for TPU slices on this CPU machine (no
TPU), its per-chip memory plan and collectives, and a program that does not fit as one line."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="--mode=compile needs libtpu: pip install -r requirements-compile.txt")

from fvdm_jax.config.load import load_config  # noqa: E402
from fvdm_jax.errors import ConfigError  # noqa: E402
from fvdm_jax.jobs import compile as compile_job  # noqa: E402
from fvdm_jax.models.dit import resolve_remat  # noqa: E402
from fvdm_jax.models.layers import resolve_attention  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_KEYS = {"arguments", "outputs", "aliased", "temporaries", "generated_code", "total"}


def tiny(topology: str, num_slices: int = 1, **model):
    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.compile.topology, config.compile.num_slices = topology, num_slices
    for key, value in model.items():
        config.model[key] = value
    return config


@pytest.mark.parametrize("name,topology,chips,hbm", [
    ("v5e-16", "v5e:4x4", 16, 16.0), ("v5litepod-4", "v5e:2x2", 4, 16.0),
    ("v6e-256", "v6e:16x16", 256, 32.0), ("v4-8", "v4:2x2x1", 4, 32.0),
    ("v5p-128", "v5p:4x4x4", 64, 95.0), ("v5p-256", "v5p:4x4x8", 128, 95.0),
    ("v5e:2x4", "v5e:2x4", 8, 16.0), ("V5P:4x4x4", "v5p:4x4x4", 64, 95.0),
])
def test_topology_names_as_users_know_them(name, topology, chips, hbm):
    target = compile_job.parse_topology(name)
    assert (target.topology, target.chips, target.hbm_gib) == (topology, chips, hbm)
    assert compile_job.parse_topology(name, 2).chips == 2 * chips


@pytest.mark.parametrize("name", ["", "v9-8", "v5p-12", "v5e-12", "v5e:4x4x4", "v5p:4x4", "tpu", "v5e-x"])
def test_unknown_topology_is_one_config_error(name):
    with pytest.raises(ConfigError) as error:
        compile_job.parse_topology(name)
    message = str(error.value)
    assert "\n" not in message and ("v5e-16" in message or "e.g. v5" in message)


def test_auto_choices_resolve_for_the_target_platform():
    assert resolve_remat("auto", "tpu") == "none" and resolve_remat("auto", "cpu") == "dots"
    assert resolve_attention("auto", "bfloat16", "gpu") == "cudnn"
    assert resolve_attention("auto", "bfloat16", "tpu") == "xla"
    config = compile_job.for_target(tiny("v5e:2x2", remat="auto", attention="auto"))
    assert (config.model.remat, config.model.attention) == ("none", "xla")


def check_fits(records, chips):
    (record,) = records
    assert record["program"] == "train_step" and record["fits"] is True
    assert record["chips"] == chips and record["device_kind"] == "TPU v5 lite"
    assert set(record["memory_gib"]) == MEMORY_KEYS
    for key in ("arguments", "outputs", "temporaries", "generated_code", "total"):
        assert record["memory_gib"][key] > 0 and record["memory_bytes"][key] > 0
    assert record["memory_gib"]["total"] < record["hbm_gib_per_chip"] == 16.0
    assert record["compile_s"] > 0 and record["model"]["remat"] == "none"
    return record


def test_tiny_train_step_compiles_for_v5e_2x2(tmp_path):
    records, text = compile_job.compile_job(tiny("v5e:2x2"), str(tmp_path))
    record = check_fits(records, 4)
    assert record["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    # Data parallel: the gradients are all-reduced, and nothing else is exchanged.
    assert record["collectives"]["all-reduce"]["count"] > 0
    assert record["collectives"]["all-reduce"]["bytes"] > 0
    assert json.loads((tmp_path / "compile.json").read_text()) == records
    assert "train_step" in text and "yes" in text


def test_tiny_train_step_compiles_for_two_slices(tmp_path):
    records, _ = compile_job.compile_job(tiny("v5e:2x2", num_slices=2), str(tmp_path))
    record = check_fits(records, 8)
    assert record["num_slices"] == 2 and record["mesh"]["data"] == 8
    assert sum(kind["count"] for kind in record["collectives"].values()) > 0


def test_a_program_that_does_not_fit_is_one_line(tmp_path):
    # ~1.6 G parameters with AdamW and EMA, replicated on every 16 GiB chip.
    records, text = compile_job.compile_job(tiny("v5e:2x2", hidden_size=8192), str(tmp_path))
    (record,) = records
    assert record["fits"] is False and record["need_gib"] > record["available_gib"] > 15
    assert "memory_gib" not in record
    line = record["error"]
    assert "\n" not in line and line.startswith("train_step does not fit on v5e:2x2")
    assert f"{record['need_gib']:.2f} GiB" in line and "16 GiB HBM" in line
    assert "does not fit by" in line and line in text
    assert json.loads((tmp_path / "compile.json").read_text())[0]["fits"] is False


@pytest.mark.parametrize("message,sizes", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
     "(49.80G) exceeds available HBM (15.75G).", (49.8, 15.75)),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
     "Used 20.25G of 15.75G hbm. Exceeded hbm capacity by 4.50G.", (20.25, 15.75)),
    ("RESOURCE_EXHAUSTED: Used 512.00M of 15.75G hbm.", (0.5, 15.75)),
    ("INVALID_ARGUMENT: something else", None),
])
def test_out_of_memory_messages(message, sizes):
    assert compile_job.out_of_memory(message) == sizes


def test_collectives_of_hlo_text():
    text = "\n".join([
        "  %all-reduce.1 = (f32[8]{0}, bf16[4,4]{1,0:T(8,128)}) all-reduce(%a, %b), channel_id=1",
        "  %get-tuple-element.2 = f32[8]{0} get-tuple-element(%all-reduce.1), index=0",
        "  %all-gather-start = (f32[2]{0}, f32[8]{0}) all-gather-start(%c), dimensions={0}",
        "  %all-gather-done = f32[8]{0} all-gather-done(%all-gather-start)",
        "  %reduce-scatter.3 = f32[2,3]{1,0} reduce-scatter(%d), dimensions={0}",
    ])
    found = compile_job.collectives(text)
    assert found["all-reduce"] == {"count": 1, "bytes": 8 * 4 + 16 * 2}
    assert found["all-gather"] == {"count": 1, "bytes": 32}
    assert found["reduce-scatter"] == {"count": 1, "bytes": 24}
    assert found["all-to-all"]["count"] == found["collective-permute"]["count"] == 0


def test_mesh_that_splits_physical_axes():
    """8x8x1 on a 4x4x4 v5p slice: jax.make_mesh finds no assignment of whole physical axes;
    make_mesh retries with allow_split_physical_axes."""
    from fvdm_jax.runtime.sharding import make_mesh

    devices = compile_job.target_devices(compile_job.parse_topology("v5p-128"))
    mesh = make_mesh({"shape": (8, 8, 1), "axes": ("data", "fsdp", "tensor")}, devices)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 8, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_command_line_unknown_topology_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-m", "fvdm_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         "--mode=compile", "--config.compile.topology=v5x-8"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "fvdm_jax: error: config.compile.topology='v5x-8' is not a TPU slice I know: give a slice "
        "such as v5e-16, v6e-256 (chips), v4-8, v5p-128 (TensorCores) or v5e:4x4, v5p:4x4x4"]


def test_peak_flops_of_the_compile_targets():
    """MFU has a peak for every TPU the compile mode names (v5p's device_kind is 'TPU v5')."""
    from fvdm_jax.training.flops import peak_flops_per_device

    kinds = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}
    for kind, peak in kinds.items():
        assert peak_flops_per_device(kind) == peak
    devices = compile_job.target_devices(compile_job.parse_topology("v5p-8"))
    assert peak_flops_per_device(devices[0].device_kind) == 459e12


def test_missing_libtpu_is_one_config_error(monkeypatch):
    from jax._src import cloud_tpu_init

    monkeypatch.setattr(cloud_tpu_init, "get_tpu_library_path", lambda: None)
    with pytest.raises(ConfigError, match=r"needs libtpu .*pip install -r requirements-compile.txt"):
        compile_job.target_devices(compile_job.parse_topology("v5e-4"))
