"""The `python -m fvdm_jax.main` entry point, run as users run it: training, export, config
errors, and a 2-process localhost run (CPU, gloo) that must match the single-process run."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fvdm_jax.checkpoint.inference import load_inference_checkpoint

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def run_main(*args, devices=8, timeout=600, extra_env=None):
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
        **(extra_env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "fvdm_jax.main", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ~40 s on 2 cores: slow; test_train's in-process export and test_launch's command-line runs
# stay in the default suite.
@pytest.mark.slow
def test_train_then_export_from_the_command_line(tmp_path):
    workdir = str(tmp_path / "run")
    code, _, err = finish(run_main(
        f"--config={TINY}", f"--workdir={workdir}", "--config.train.num_steps=4",
        "--config.train.log_every_steps=2", "--config.checkpoint.every_steps=2",
        "--config.train.peak_flops_per_device=1e11",
    ))
    assert code == 0, err[-3000:]
    records = losses(workdir)
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["loss"]) and "mse" in r and "vb" in r and "grad_norm" in r for r in records)
    assert "first_step_sec" in records[0] and 0 < records[-1]["mfu"] < 1
    assert records[-1]["videos_per_sec"] == pytest.approx(8 * records[-1]["steps_per_sec"])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

    code, out, err = finish(run_main(f"--config={TINY}", f"--workdir={workdir}", "--mode=export"))
    assert code == 0, err[-3000:]
    exported = out.strip().splitlines()[-1]
    params, config = load_inference_checkpoint(exported)
    assert config["model"]["hidden_size"] == 32 and "params" in params


# ~60 s on 2 cores: slow; test_train's in-process signal tests and test_preemption_multihost's
# SIGTERM run stay in the default suite.
@pytest.mark.slow
def test_sigterm_exits_143_after_saving_and_a_rerun_resumes(tmp_path):
    """What a requeue wrapper sees: 143 (not 0) with a checkpoint of the step the run had reached
    (not of a periodic save: those are 100000 steps apart); the rerun trains on from that step."""
    import signal
    import time

    workdir = str(tmp_path / "run")
    args = (f"--config={TINY}", f"--workdir={workdir}", "--config.train.num_steps=100000",
            "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=100000")
    proc = run_main(*args, devices=1)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.isfile(metrics) and os.path.getsize(metrics) > 0) and proc.poll() is None:
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 143, err[-3000:]
    saved = [int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 1, saved
    # The checkpoint is the last step trained and logged, saved because of the signal.
    assert losses(workdir)[-1]["step"] == saved[0], losses(workdir)[-1]
    assert "SIGTERM received" in err and f"stopped at step {saved[0]} (SIGTERM)" in err, err[-3000:]
    code, _, err = finish(run_main(*args[:2], f"--config.train.num_steps={saved[0] + 1}", devices=1))
    assert code == 0, err[-3000:]
    assert "resumed from" in err and f"at step {saved[0]}" in err, err[-3000:]
    # The rerun trained exactly one step, the next one: every step is logged once, and the first
    # step of each process (the one that carries first_step_sec) is 1, then saved + 1.
    records = losses(workdir)
    assert [r["step"] for r in records] == list(range(1, saved[0] + 2)), records
    assert [r["step"] for r in records if "first_step_sec" in r] == [1, saved[0] + 1], records


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.train.batch_sze=3", "unknown config key 'batch_sze'"),
        ("--config.train.batch_size=abc", "invalid literal"),
        ("--mode=dance", "--mode=dance"),
    ],
)
def test_bad_flags_fail_with_one_line(tmp_path, flag, message):
    code, _, err = finish(run_main(f"--config={TINY}", f"--workdir={tmp_path}", flag))
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_missing_config_file_fails_with_one_line(tmp_path):
    code, _, err = finish(run_main("--config=configs/no_such.py", f"--workdir={tmp_path}"))
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and "no such file" in lines[0], err
    assert "configs/demo.py" in lines[0] and "tiny.py" in lines[0]  # the fix: files that exist


def test_help_teaches_the_modes_and_points_at_the_schema():
    code, out, err = finish(run_main("--help"))
    assert code == 0 and not err.strip(), err
    lines = out.splitlines()
    for mode in ("train", "sample", "eval", "encode", "export"):  # one line each
        assert len([line for line in lines if line.startswith(f"  {mode}  ")]) == 1, out
    assert "configs/default.py" in out and "--config.section.key=value" in out
    for flag in ("--config", "--workdir", "--mode (default: train)", "--log_level", "--verbosity"):
        assert f"  {flag}" in out, flag
    assert "tensorboard --logdir" in out and len(lines) < 80  # not absl's page of every flag


@pytest.mark.parametrize("args, message", [
    ((), "--config is required, e.g. python -m fvdm_jax.main --config=configs/demo.py"),
    ((f"--config={TINY}",), "--workdir is required"),
    ((f"--config={TINY}", "--workdir=/tmp/x", "train"), "unexpected arguments train: flags take the form"),
])
def test_missing_flags_fail_with_one_line(args, message):
    code, _, err = finish(run_main(*args))
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_a_workdir_that_is_a_file_fails_with_one_line(tmp_path):
    path = tmp_path / "run"
    path.write_text("")
    code, _, err = finish(run_main(f"--config={TINY}", f"--workdir={path}"))
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 1 and len(lines) == 1 and f"--workdir={path} is a file; give a directory" in lines[0], err


@pytest.mark.parametrize("mode, fix", [
    ("export", "train first: python -m fvdm_jax.main --config="),
    ("sample", "--config.sample.checkpoint=DIR"),
    ("eval", "--config.eval.generated=PATH/samples.npz"),
])
def test_modes_that_need_a_checkpoint_say_how_to_get_one(tmp_path, mode, fix):
    workdir = tmp_path / "missing" / "run"
    code, _, err = finish(run_main(f"--config={TINY}", f"--workdir={workdir}", f"--mode={mode}"))
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 1 and len(lines) == 1, err
    assert f"--mode={mode} needs a training checkpoint and {workdir}/checkpoints has none" in lines[0]
    assert fix in lines[0] and f"--workdir={workdir}" in lines[0], lines[0]
    assert not (tmp_path / "missing").exists()  # a reading mode creates nothing


def test_bad_config_value_fails_with_one_line(tmp_path):
    code, _, err = finish(run_main(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.batch_size=12"))
    errors = [line for line in err.splitlines() if line.startswith("fvdm_jax: error")]
    assert code == 1 and len(errors) == 1 and "train.batch_size=12" in errors[0], err[-2000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(*args):
    """Runs `python -m fvdm_jax.main *args` as 2 processes x 4 CPU devices (gloo, a localhost
    coordinator); returns the last line process 0 printed (the path it wrote)."""
    port = _free_port()
    procs = [run_main(*args, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                      f"--process_id={i}", devices=4) for i in range(2)]
    out = [finish(p) for p in procs]
    for code, _, err in out:
        assert code == 0, err[-3000:]
    return out[0][1].strip().splitlines()[-1]


def one_process(*args):
    """`python -m fvdm_jax.main *args` as 1 process with 8 CPU devices; its last printed line."""
    code, out, err = finish(run_main(*args))
    assert code == 0, err[-3000:]
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 steps of tiny.py trained by 2 processes x 4 CPU devices (gloo) in `multi`, and by this
    process's 8 devices in `single`; (config, multi, single, the 2 processes' stdout/stderr)."""
    from fvdm_jax.config.load import load_config
    from fvdm_jax.training.loop import train

    tmp_path = tmp_path_factory.mktemp("two_processes")
    common = [f"--config={TINY}", "--config.train.num_steps=3", "--config.train.log_every_steps=1"]
    port = _free_port()
    shared = str(tmp_path / "multi")
    procs = [
        run_main(
            *common, f"--workdir={shared}", f"--coordinator_address=localhost:{port}",
            "--num_processes=2", f"--process_id={i}", devices=4,
        )
        for i in range(2)
    ]
    config = load_config(TINY)
    config.train.num_steps, config.train.log_every_steps = 3, 1
    single = str(tmp_path / "single")
    train(config, single)  # in this process: 8 devices, the same XLA flags
    results = [finish(p) for p in procs]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return config, shared, single, results


def single_process_ema(config, single):
    import jax

    from fvdm_jax.training.loop import train

    ema = train(config, single).state.ema_params  # finished: restores, trains nothing
    return [np.asarray(jax.device_get(leaf)) for leaf in jax.tree_util.tree_leaves(ema)]


def assert_same_videos(first, *others):
    with np.load(first) as a:
        assert a["videos"].std() > 0
        for path in others:  # the same videos up to uint8 rounding
            with np.load(path) as b:
                assert a["videos"].shape == b["videos"].shape
                assert np.abs(a["videos"].astype(int) - b["videos"].astype(int)).max() <= 1


# Two 2-process runs and one 1-process run, ~100 s on 2 cores: slow; test_preemption_multihost
# and test_launch keep 2-process runs in the default suite.
@pytest.mark.slow
def test_two_processes_match_one(trained, tmp_path):
    """2 processes x 4 CPU devices (gloo) train like this process's 8 devices."""
    import jax

    config, shared, single, results = trained
    assert "process 1/2" in results[1][2] or "process 1/2" in results[1][1]
    multi = [r["loss"] for r in losses(shared)]
    ref = [r["loss"] for r in losses(single)]
    assert len(multi) == len(ref) == 3
    np.testing.assert_allclose(multi, ref, rtol=1e-5)

    # Export on 2 processes (each writes its shards, process 0 the config), then sample from the
    # export on 2 processes and on 1: the same videos as sampling this process's own workdir.
    exported = two_processes(f"--config={TINY}", f"--workdir={shared}", "--mode=export")
    params, saved = load_inference_checkpoint(exported)
    for got, want in zip(jax.tree_util.tree_leaves(params), single_process_ema(config, single)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    sample = ["--mode=sample", "--config.sample.num_videos=4", "--config.sample.batch_size=4",
              "--config.sample.num_steps=3", "--config.sample.save_media=False",
              f"--config.sample.checkpoint={exported}"]
    from_export = two_processes(f"--config={TINY}", f"--workdir={tmp_path / 'sample2'}", *sample)
    one = one_process(f"--config={TINY}", f"--workdir={tmp_path / 'sample1'}", *sample)
    # From the training workdir's EMA weights, not the export:
    from_workdir = one_process(f"--config={TINY}", f"--workdir={shared}", *sample[:-1])
    with np.load(from_export) as a:
        assert a["videos"].shape[0] == 4
    assert_same_videos(from_export, one, from_workdir)


@pytest.mark.slow  # three 2-process runs, one 1-process run: ~50 s on 2 cores (~2 min alone)
def test_two_processes_with_parameters_sharded_across_them(trained, tmp_path):
    """mesh 1,8,1 (FSDP over all 8 devices of 2 processes x 4): no process holds a whole
    parameter. Export on 2 processes writes each process's shards into one inference checkpoint
    equal to the single-process EMA; sampling on 2 processes, from that export and from the
    training workdir, gives the single-process videos."""
    import jax

    config, shared, single, _ = trained
    mesh = "--config.mesh.shape=1,8,1"
    exported = two_processes(f"--config={TINY}", f"--workdir={shared}", "--mode=export", mesh,
                             f"--config.checkpoint.export_dir={tmp_path / 'export_fsdp'}")
    # The shardings the arrays were written from (orbax's record): the 1x8x1 mesh over both
    # processes' devices, most parameters split over 'fsdp'.
    with open(os.path.join(exported, "params", "_sharding")) as f:
        written = [json.loads(entry) for entry in json.load(f).values()]  # JSON in JSON
    assert {tuple(w["shape"]) for w in written} == {(1, 8, 1)}
    assert sum("fsdp" in (w["partition_spec"] or []) for w in written) > len(written) // 2
    params, _ = load_inference_checkpoint(exported)
    for got, want in zip(jax.tree_util.tree_leaves(params), single_process_ema(config, single)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # The global batch divides by data x fsdp = 8.
    sample = ["--mode=sample", "--config.sample.num_videos=8", "--config.sample.batch_size=8",
              "--config.sample.num_steps=3", "--config.sample.save_media=False"]
    from_export = two_processes(f"--config={TINY}", f"--workdir={tmp_path / 'sample2'}", *sample, mesh,
                                f"--config.sample.checkpoint={exported}")
    from_workdir = two_processes(f"--config={TINY}", f"--workdir={shared}", *sample, mesh,
                                 f"--config.sample.output_dir={tmp_path / 'samples_fsdp'}")
    one = one_process(f"--config={TINY}", f"--workdir={tmp_path / 'sample1'}", *sample,
                      f"--config.sample.checkpoint={exported}")
    with np.load(from_export) as a:
        assert a["videos"].shape[0] == 8
    assert_same_videos(one, from_export, from_workdir)
