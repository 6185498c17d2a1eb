"""Stopping a multi-process run (fvdm_jax/training/preemption.py), with 2 real processes on
localhost (2 x 2 CPU devices, gloo, mesh 1,4,1, as users run `python -m fvdm_jax.main`): a signal
on one host stops every host after the same step with one checkpoint of it and one exit code, and
the rerun equals an uninterrupted run bit for bit; a host that dies ends the other with one line
and exit 75, and the rerun resumes from the newest finished checkpoint. Plus the pieces in-process.

Each 2-process run costs ~20-40 s of startup on 2 cores (a shared compilation cache helps the
later ones); the reference run and the SIGTERM-to-one-process case are in the default suite, the
other cases are marked slow.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from test_main import TINY, _free_port

from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime.distributed import peer_timeout_s
from fvdm_jax.training.preemption import (
    EXIT_PEER_LOST,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    Preemption,
    StopAgreement,
    _Vote,
    peer_failure,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
STEPS = 20  # the reference run; a signal after step 2 stops the others at step 10 (votes every 5)
BOUND = 120  # seconds from the signal (or the kill) until both processes have exited
CACHE = tempfile.mkdtemp(prefix="fvdm_multihost_test_cache_")  # shared by every run of this module


def start(workdir, *flags, steps=STEPS, every_steps=1000, extra_env=None):
    """Two processes of `python -m fvdm_jax.main` on one workdir; output to WORKDIR.out/err{i}."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           "JAX_COMPILATION_CACHE_DIR": CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", **(extra_env or {})}
    procs = []
    for i in range(2):
        out = open(f"{workdir}.out{i}", "w")
        err = open(f"{workdir}.err{i}", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fvdm_jax.main", f"--config={TINY}", f"--workdir={workdir}",
             f"--config.train.num_steps={steps}", "--config.train.log_every_steps=1",
             f"--config.checkpoint.every_steps={every_steps}", "--config.mesh.shape=1,4,1",
             "--config.checkpoint.preemption_check_every_steps=5",
             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}", *flags],
            env=env, cwd=ROOT, stdout=out, stderr=err, text=True))
        out.close()
        err.close()
    return procs


def wait(procs, timeout):
    """Exit codes; kills what is still running after `timeout` seconds (and fails)."""
    deadline = time.time() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"still running {timeout} s later")
    return codes


def stderr(workdir, i):
    with open(f"{workdir}.err{i}") as f:
        return f.read()


def rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps_saved(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def wait_for(condition, procs, workdir, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        for i, p in enumerate(procs):
            assert p.poll() is None, f"process {i} ended early ({p.returncode}): {stderr(workdir, i)[-3000:]}"
        assert time.time() < deadline, "training did not get there"
        time.sleep(0.1)


def fingerprints(workdir, step):
    """The checksums of every array of the checkpoint at `step` (taken on the devices at save)."""
    from fvdm_jax.checkpoint.manager import TrainCheckpointer

    ckpt = TrainCheckpointer(workdir, {"every_steps": 1, "keep": 1, "async_save": False}, read_only=True)
    try:
        return ckpt.saved_fingerprints(step)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process run of STEPS steps: its losses and final fingerprints."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    procs = start(workdir)
    codes = wait(procs, 600)
    assert codes == [0, 0], stderr(workdir, 0)[-3000:] + stderr(workdir, 1)[-3000:]
    return [r["loss"] for r in rows(workdir)], fingerprints(workdir, STEPS)


def resume_equals_reference(workdir, saved, reference):
    """Reruns the interrupted workdir to STEPS: it resumes at `saved` and ends bit for bit equal."""
    procs = start(workdir)
    codes = wait(procs, 600)
    assert codes == [0, 0], stderr(workdir, 0)[-3000:] + stderr(workdir, 1)[-3000:]
    assert f"at step {saved}" in stderr(workdir, 0) and "resumed from" in stderr(workdir, 0)
    losses, prints = reference
    records = rows(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # every step once
    assert [r["loss"] for r in records] == losses  # exactly
    assert fingerprints(workdir, STEPS) == prints  # every array, bit for bit


def signalled_run(tmp_path, send):
    """Starts a run, waits for step 2, calls send(procs); returns (workdir, codes, seconds)."""
    workdir = str(tmp_path / "run")
    procs = start(workdir)
    wait_for(lambda: len(rows(workdir)) >= 2, procs, workdir)
    sent = time.time()
    send(procs)
    codes = wait(procs, BOUND)
    return workdir, codes, time.time() - sent


def check_one_checkpoint_of_the_same_step(workdir, reason):
    saved = steps_saved(workdir)
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved
    assert rows(workdir)[-1]["step"] == saved[0]  # the last step trained and logged
    for i in range(2):  # every process stopped after that step, for the same reason
        assert f"stopped at step {saved[0]} ({reason}" in stderr(workdir, i), stderr(workdir, i)[-2000:]
        assert "Check failure stack trace" not in stderr(workdir, i)
    return saved[0]


# ~90 s on 2 cores with its reference run: slow like the rest of this file; test_launch keeps a
# 2-process run, test_train the signal handling, in the default suite.
@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path, reference):
    workdir, codes, seconds = signalled_run(tmp_path, lambda procs: procs[0].send_signal(signal.SIGTERM))
    assert codes == [EXIT_SIGTERM, EXIT_SIGTERM], stderr(workdir, 0)[-3000:] + stderr(workdir, 1)[-3000:]
    saved = check_one_checkpoint_of_the_same_step(workdir, "SIGTERM on process 0")
    print(f"stopped at step {saved}, both exited {seconds:.1f} s after the signal")
    resume_equals_reference(workdir, saved, reference)


@pytest.mark.slow
def test_sigterm_to_both_a_second_apart(tmp_path, reference):
    def send(procs):
        procs[0].send_signal(signal.SIGTERM)
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGTERM)

    workdir, codes, seconds = signalled_run(tmp_path, send)
    assert codes == [EXIT_SIGTERM, EXIT_SIGTERM], stderr(workdir, 0)[-3000:] + stderr(workdir, 1)[-3000:]
    saved = check_one_checkpoint_of_the_same_step(workdir, "SIGTERM on process")
    resume_equals_reference(workdir, saved, reference)


@pytest.mark.slow
def test_ctrl_c_to_one_process_stops_both_with_130(tmp_path, reference):
    workdir, codes, seconds = signalled_run(tmp_path, lambda procs: procs[1].send_signal(signal.SIGINT))
    assert codes == [EXIT_SIGINT, EXIT_SIGINT], stderr(workdir, 0)[-3000:] + stderr(workdir, 1)[-3000:]
    saved = check_one_checkpoint_of_the_same_step(workdir, "SIGINT on process 1")
    resume_equals_reference(workdir, saved, reference)


def one_error_line(text):
    lines = [line for line in text.splitlines() if line.startswith("fvdm_jax: error:")]
    assert len(lines) == 1, text[-3000:]
    assert "Check failure stack trace" not in text and "Fatal Python error" not in text, text[-3000:]
    return lines[0]


@pytest.mark.slow
def test_kill_9_of_one_process_ends_the_other_with_one_line(tmp_path, reference):
    """A finished checkpoint every 2 steps; process 1 is killed; process 0 ends at once (gloo
    reports the broken connection) with one line and 75; the rerun resumes from that checkpoint."""
    workdir = str(tmp_path / "run")
    procs = start(workdir, every_steps=2)
    wait_for(lambda: steps_saved(workdir) and len(rows(workdir)) >= 5, procs, workdir)
    killed = time.time()
    procs[1].send_signal(signal.SIGKILL)
    code = wait(procs[:1], BOUND)[0]
    assert code == EXIT_PEER_LOST, stderr(workdir, 0)[-3000:]
    assert time.time() - killed < 60
    line = one_error_line(stderr(workdir, 0))
    assert "process 0/2: a collective failed, another process died" in line, line
    newest = steps_saved(workdir)[-1]
    assert f"a rerun resumes from checkpoint step {newest}, the newest finished one" in line, line
    procs[1].wait()
    resume_equals_reference(workdir, newest, reference)


@pytest.mark.slow
def test_a_frozen_process_is_noticed_by_the_heartbeat(tmp_path):
    """SIGSTOP: the peer's sockets stay open, so the collective hangs instead of failing (as with
    NCCL); the heartbeat watch ends process 0 after FVDM_PEER_TIMEOUT_S, before JAX's own."""
    workdir = str(tmp_path / "run")
    procs = start(workdir, extra_env={"FVDM_PEER_TIMEOUT_S": "8"})
    wait_for(lambda: len(rows(workdir)) >= 2, procs, workdir)
    stopped = time.time()
    procs[1].send_signal(signal.SIGSTOP)
    try:
        code = wait(procs[:1], BOUND)[0]
        seconds = time.time() - stopped
    finally:
        procs[1].kill()
    assert code == EXIT_PEER_LOST, stderr(workdir, 0)[-3000:]
    assert 4 <= seconds < 30, seconds  # the timeout, give or take one heartbeat period
    line = one_error_line(stderr(workdir, 0))
    assert "process 1 stopped responding (no heartbeat for 8 s" in line, line
    assert "a rerun starts from step 0 (no finished checkpoint)" in line, line


# --- the pieces, in this process (8 CPU devices, one process) ---------------------------------


def test_one_process_stops_at_the_next_step_on_its_own_flag():
    preemption = Preemption()
    agreement = StopAgreement(preemption, every=10)
    assert not agreement.before_first_step(0) and not agreement.after_step(3)
    preemption.signum = signal.SIGINT
    assert agreement.after_step(4)  # not a multiple of 10: one process does not wait for a vote
    assert agreement.exit_code == EXIT_SIGINT and agreement.reason == "SIGINT"


def test_the_vote_reads_every_process_flag():
    vote = _Vote()
    assert vote.receive(vote.send(0)).tolist() == [0]
    assert vote.receive(vote.send(2)).tolist() == [2]
    assert vote.receive(vote.send(0)).tolist() == [0]


def test_the_agreed_reason_and_code_across_processes():
    agreement = StopAgreement(Preemption())
    agreement.processes = 3
    assert agreement._decide([1, 0, 2])
    assert agreement.exit_code == EXIT_SIGINT  # a Ctrl-C anywhere: every process 130
    assert agreement.reason == "SIGINT on process 2, SIGTERM on process 0"
    agreement._decide([0, 1, 0])
    assert agreement.exit_code == EXIT_SIGTERM and agreement.reason == "SIGTERM on process 1"


def test_which_errors_mean_a_peer_died():
    class JaxRuntimeError(RuntimeError):
        pass

    gloo = JaxRuntimeError("UNKNOWN: Gloo AllGather failed: pair.cc:538] Read error: Connection reset by peer")
    assert "a collective failed" in peer_failure(gloo)
    try:  # wrapped, as a failed async save wraps it
        try:
            raise gloo
        except JaxRuntimeError as error:
            raise RuntimeError("saving a checkpoint failed") from error
    except RuntimeError as wrapped:
        assert "Connection reset by peer" in peer_failure(wrapped)
    assert peer_failure(JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")) is None
    assert peer_failure(ValueError("Connection reset by peer")) is None  # not a runtime error


def test_the_peer_timeout_is_one_line_when_wrong():
    assert peer_timeout_s({}) == 60 and peer_timeout_s({"FVDM_PEER_TIMEOUT_S": "7.5"}) == 7.5
    for bad in ("0", "-3", "soon"):
        with pytest.raises(ConfigError, match="FVDM_PEER_TIMEOUT_S"):
            peer_timeout_s({"FVDM_PEER_TIMEOUT_S": bad})


def test_a_handler_installed_outside_python_is_reset_to_default():
    """signal.signal returns None for a C-level handler (JAX's own SIGTERM handler, for one);
    leaving the loop then restores the default instead of failing."""
    preemption = Preemption()
    with preemption:
        preemption._previous[signal.SIGTERM] = None
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
