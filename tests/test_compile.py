"""--mode=compile: the real train step compiled by libtpu for TPU slices on this CPU machine (no
TPU), its per-chip memory plan and collectives, and a program that does not fit as one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("libtpu", reason="--mode=compile needs libtpu: pip install -r requirements-compile.txt")

from fvdm_jax.config.load import load_config  # noqa: E402
from fvdm_jax.errors import ConfigError  # noqa: E402
from fvdm_jax.jobs import compile as compile_job  # noqa: E402
from fvdm_jax.models.dit import resolve_remat  # noqa: E402
from fvdm_jax.models.layers import resolve_attention  # noqa: E402
from fvdm_jax.runtime import compiled as xla  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_KEYS = {"arguments", "outputs", "aliased", "temporaries", "generated_code", "total"}


def tiny(topology: str, num_slices: int = 1, programs=("train_step",), **model):
    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.compile.topology, config.compile.num_slices = topology, num_slices
    config.compile.programs = programs
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


@pytest.mark.parametrize("name,topology,count,memory", [
    ("h100-8", "1x1x8", 8, 79.108 * 0.75), ("H200-2", "1x1x2", 2, 141.0 * 0.75),
    ("h100-32", "1x4x8", 32, 79.108 * 0.75),
])
def test_gpu_names(name, topology, count, memory):
    target = compile_job.parse_topology(name)
    assert (target.topology, target.chips, target.platform) == (topology, count, "gpu")
    assert target.hbm_gib == pytest.approx(memory, abs=0.01)


@pytest.mark.parametrize("name", ["", "v9-8", "v5p-12", "v5e-12", "v5e:4x4x4", "v5p:4x4", "tpu",
                                  "v5e-x", "h100-12", "h100-0", "a100-8"])
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


@pytest.mark.slow  # ~15 s; the one-slice compile tests stay in the default suite
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
    assert xla.out_of_memory(message) == sizes


def test_fsdp_gradients_are_reduce_scattered_not_all_reduced():
    """Under FSDP each chip keeps 1/fsdp of every weight, so the gradients must reach it as a
    reduce-scatter (XLA:TPU: an all-reduce-scatter fusion), never as an all-reduce of the full
    gradient (twice the traffic) sliced afterwards."""
    import jax

    from fvdm_jax.training import fit

    config = compile_job.for_target(tiny("v5e:2x2", hidden_size=256))
    config.mesh.shape = (1, 4, 1)
    devices = compile_job.target_devices(compile_job.parse_topology("v5e:2x2"))
    setup, lowered = fit.lower_train_step(config, devices)
    hlo = lowered.compile().as_text()
    sharded = {}  # full shapes of the fsdp-sharded weights (stacked and per layer) -> bytes
    for leaf, sharding in zip(jax.tree_util.tree_leaves(setup.abstract_state.params),
                              jax.tree_util.tree_leaves(setup.state_shardings.params)):
        if "fsdp" in jax.tree_util.tree_leaves(tuple(sharding.spec)):
            for dims in (tuple(leaf.shape), tuple(leaf.shape[1:])):
                sharded[dims] = 4 * int(np.prod(dims))
    ops = list(xla.collective_ops(hlo))
    reduced = [xla.shape_dims(shape) for kind, _, shape in ops if kind == "all-reduce"]
    full = [dims for group in reduced for dims in group if dims in sharded and len(dims) > 1]
    # XLA may all-reduce a few tiny gradients whole (here the patch embedding and the output
    # layer, 0.8% of the sharded weights); the blocks' gradients must be reduce-scattered.
    weights = sum(4 * int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(
        setup.abstract_state.params))
    assert sum(sharded[dims] for dims in full) < 0.05 * weights, f"all-reduced whole: {full}"
    scattered = [shape for kind, _, shape in ops if kind == "reduce-scatter"]
    assert sum(len(xla.shape_dims(shape)) for shape in scattered) >= 4  # the blocks' weights


def test_collectives_of_hlo_text():
    text = "\n".join([
        "  %all-reduce.1 = (f32[8]{0}, bf16[4,4]{1,0:T(8,128)}) all-reduce(%a, %b), channel_id=1",
        "  %get-tuple-element.2 = f32[8]{0} get-tuple-element(%all-reduce.1), index=0",
        "  %all-gather-start = (f32[2]{0}, f32[8]{0}) all-gather-start(%c), dimensions={0}",
        "  %all-gather-done = f32[8]{0} all-gather-done(%all-gather-start)",
        "  %reduce-scatter.3 = f32[2,3]{1,0} reduce-scatter(%d), dimensions={0}",
    ])
    found = xla.collectives(text)
    assert found["all-reduce"] == {"count": 1, "bytes": 8 * 4 + 16 * 2}
    assert found["all-gather"] == {"count": 1, "bytes": 32}
    assert found["reduce-scatter"] == {"count": 1, "bytes": 24}
    assert found["all-to-all"]["count"] == found["collective-permute"]["count"] == 0
    # XLA:TPU's reduce-scatter: an all-reduce inside an all-reduce-scatter fusion, the shard out.
    fused = "\n".join([
        "%all-reduce-scatter.3 (input.3: f32[2048,512]) -> f32[2048,128] {",
        "  %input.3 = f32[2048,512]{1,0} parameter(0)",
        "  %all-reduce.95 = f32[2048,512]{1,0} all-reduce(%input.3), channel_id=59",
        "  ROOT %dynamic-slice.162 = f32[2048,128]{1,0} dynamic-slice(%all-reduce.95, %c, %m)",
        "}",
        "%other (x: f32[4]) -> f32[4] {",
        "  %all-reduce.7 = f32[4]{0} all-reduce(%x), channel_id=2",
        "}",
    ])
    found = xla.collectives(fused)
    assert found["reduce-scatter"] == {"count": 1, "bytes": 2048 * 128 * 4}
    assert found["all-reduce"] == {"count": 1, "bytes": 16}


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
        "fvdm_jax: error: config.compile.topology='v5x-8' is not a TPU slice or GPU I know: give a "
        "slice such as v5e-16, v6e-256 (chips), v4-8, v5p-128 (TensorCores) or v5e:4x4, v5p:4x4x4, "
        "or GPUs h100-8, h200-16 (8 per host)"]


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


def test_sampler_and_vae_encode_programs(tmp_path):
    """The sampler's scan (one sample.batch_size batch of 'generate') and one --mode=encode call
    of a VAE compile for the slice too; a pixel model has no VAE program."""
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 8], "layers_per_block": 1,
           "norm_num_groups": 4, "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    (tmp_path / "vae.json").write_text(json.dumps(vae))
    config = tiny("v5e:2x2", programs=("sample", "vae_encode"))
    config.sample.batch_size, config.sample.num_steps = 2, 5
    records, text = compile_job.compile_job(config, str(tmp_path))
    sample, encode = records
    assert sample["program"] == "sample" and sample["fits"] is True
    assert (sample["batch_size"], sample["padded_batch"], sample["num_steps"]) == (2, 4, 5)
    assert sample["memory_gib"]["total"] > 0 and sample["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert encode["fits"] is None and "pixels" in encode["skipped"] and "vae_encode: skipped" in text

    config.data.source, config.compile.vae_config = "latents", str(tmp_path / "vae.json")
    records, _ = compile_job.compile_job(config, str(tmp_path))
    encode = records[1]
    assert encode["fits"] is True and encode["frames"] == 4 * config.vae.encode_batch_size
    assert encode["image_size"] == 2 * config.model.input_size  # two blocks: downsampled by 2
    assert encode["memory_gib"]["arguments"] > 0


def test_layout_candidates_in_order_of_cost():
    from fvdm_jax.training import fit

    # 8 devices, micro-batch 4, 2 heads: the batch cannot span all 8, so tensor takes 2.
    assert fit.meshes(8, 4, 2) == [(4, 1, 2), (2, 2, 2), (1, 4, 2)]
    assert fit.meshes(4, 8, 2)[:3] == [(4, 1, 1), (2, 2, 1), (1, 4, 1)]
    config = tiny("v5e:2x2")
    levels = fit.levels(config, 4)
    first = [(layout.grad_accum_steps, layout.remat) for layout in (level[0] for level in levels)]
    assert first[:5] == [(1, "none"), (1, "dots"), (1, "dots_no_batch"), (1, "full"), (2, "none")]
    unrolled = [(level[0].grad_accum_steps, level[0].remat) for level in levels if not level[0].scan_layers]
    assert unrolled == [(1, "none"), (1, "dots")] and not levels[-1][0].scan_layers
    layout = levels[-1][2]
    assert layout.flags() == ('--config.mesh.shape="(1,4,1)" --config.model.remat=dots '
                              '--config.train.grad_accum_steps=1 --config.model.scan_layers=False')
    applied = layout.apply(config)
    assert (applied.mesh.shape, applied.model.remat, applied.model.scan_layers) == ((1, 4, 1), "dots", False)


def test_mesh_fit_on_cpu_takes_a_layout_the_batch_divides_over():
    """On a CPU nothing is compiled: the configured layout if the batch divides over it, else
    the first that does (here batch 4 on 8 devices: data 4 x tensor 2)."""
    import jax

    from fvdm_jax.training import fit

    config = tiny("v5e:2x2")
    config.mesh.fit = True
    resolved, line = fit.resolve(config, jax.devices()[:4])
    assert tuple(resolved.mesh.shape) == (4, 1, 1) and "configured" in line
    config.train.batch_size = 4
    resolved, line = fit.resolve(config, jax.devices()[:8])
    assert tuple(resolved.mesh.shape) == (4, 1, 2) and "data 4 x fsdp 1 x tensor 2" in line
    assert resolved.model.remat == "dots"  # the CPU's own choice of remat=auto is kept
    config.mesh.fit = False
    assert fit.resolve(config, jax.devices()) == (config, None)


@pytest.mark.slow
def test_mesh_fit_and_compile_fit_find_a_layout_that_fits(tmp_path):
    """~1.6 G parameters on a v5e:2x2: data parallel needs 49.8 GiB per chip. mesh.fit takes the
    first layout that fits; compile.fit compiles every mesh of the first level that has a fit and
    keeps the one with the fewest collective bytes."""
    config = tiny("v5e:2x2", hidden_size=8192)
    config.mesh.fit = True
    records, text = compile_job.compile_job(config, str(tmp_path))
    (record,) = records
    assert record["fits"] is True and record["layout"]["mesh_shape"] != [4, 1, 1]
    assert record["search"][0]["fits"] is False and record["search"][-1]["fits"] is True
    assert record["layout_choice"].startswith("first fit") and record["flags"] in text
    config.mesh.fit, config.compile.fit = False, True
    (best,), _ = compile_job.compile_job(config, str(tmp_path))
    fitting = [t for t in best["search"] if t["fits"]]
    assert best["fits"] is True and len(fitting) >= 1
    assert xla.collective_bytes(best) == min(t["collective_bytes"] for t in fitting)


@pytest.mark.slow
def test_fvd_feature_program(tmp_path):
    config = tiny("v5e:2x2", programs=("fvd_features",))
    (record,), text = compile_job.compile_job(config, str(tmp_path))
    assert record["fits"] is None and "at least 9 frames" in record["skipped"]  # tiny: 4 frames
    config.eval.batch_size, config.model.num_frames = 4, 16
    (record,), _ = compile_job.compile_job(config, str(tmp_path))
    assert record["fits"] is True and record["video_shape"] == [16, 8, 8, 3]
    assert record["memory_gib"]["arguments"] > 0.04  # the I3D's weights, replicated


def test_gpu_train_step_compiles_without_a_gpu(tmp_path):
    """With jax's CUDA plugin (requirements-compile-gpu.txt, optional) the CUDA compiler gives
    the per-GPU memory plan of an H100 host; XLA:GPU does not refuse a program that exceeds the
    memory, so the plan is compared with the 75% of it JAX preallocates."""
    pytest.importorskip("jax_plugins.xla_cuda12", reason="pip install --no-deps -r requirements-compile-gpu.txt")
    (record,), _ = compile_job.compile_job(tiny("h100-8"), str(tmp_path))
    assert record["fits"] is True and record["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert record["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and record["chips"] == 8
    assert record["memory_bytes"]["arguments"] > 0 and record["model"]["remat"] == "none"
    (big,), text = compile_job.compile_job(tiny("h100-1", hidden_size=16384), str(tmp_path))
    assert big["fits"] is False and big["need_gib"] > 59.3
    assert big["error"].startswith("train_step does not fit on h100-1") and big["error"] in text


@pytest.mark.slow
def test_train_throughput_compiles_for_a_slice():
    """bench/train_throughput.py --compile_only --topology: the memory plan of the step for the
    slice's chips, not for this machine."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--config=configs/tiny.py", "--compile_only",
         "--topology=v5e-4"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["device_kind"] == "TPU v5 lite" and record["devices"] == 4
    assert record["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and record["model"]["remat"] == "none"
