"""launch/local_multigpu.sh with a stub interpreter on PATH that records what it is started with:
the per-process flags and environment, and how the script stops its processes (SIGTERM, then
SIGKILL after GRACE_SECONDS for a process stuck in a collective)."""

import os
import signal
import subprocess
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(ROOT, "launch", "local_multigpu.sh")

# The stub: records its arguments and CUDA_VISIBLE_DEVICES, then behaves as STUB_<process_id>
# says: 'ok' exits 0, 'fail' exits 3, 'train' runs until SIGTERM and exits 143 like a saving
# run, 'stuck' ignores SIGTERM (a process waiting in a collective).
STUB = r"""#!/usr/bin/env bash
id=x
for a in "$@"; do case "$a" in --process_id=*) id="${a#--process_id=}";; esac; done
echo "$id|$CUDA_VISIBLE_DEVICES|$JAX_LOCAL_DEVICE_IDS|$*" >> "$STUB_LOG"
mode_var="STUB_$id"; mode="${!mode_var:-ok}"
case "$mode" in
  ok) exit 0;;
  fail) sleep 0.5; exit 3;;
  train) trap 'echo "$id saved" >> "$STUB_LOG"; exit 143' TERM; while true; do sleep 0.1; done;;
  stuck) trap '' TERM; while true; do sleep 0.1; done;;
esac
"""


def start(tmp_path, **modes):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "stub.log"
    env = {**os.environ, "PYTHON": str(stub), "NUM_PROCESSES": "2", "GPUS": "4,5",
           "COORDINATOR_PORT": "23456", "GRACE_SECONDS": "2", "STUB_LOG": str(log),
           **{f"STUB_{k[1:]}": v for k, v in modes.items()}}
    proc = subprocess.Popen(["bash", SCRIPT, "configs/tiny.py", str(tmp_path / "run"), "--config.x=1"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, log


def records(log):
    return [line.split("|") for line in log.read_text().splitlines() if "|" in line]


def test_two_processes_get_their_flags_and_gpus(tmp_path):
    proc, log = start(tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    started = sorted(records(log))
    assert [r[:3] for r in started] == [["0", "4", "0"], ["1", "5", "0"]]
    for pid, (_, _, _, argv) in enumerate(started):
        assert argv.split() == ["-m", "fvdm_jax.main", "--config=configs/tiny.py",
                                f"--workdir={tmp_path / 'run'}", "--coordinator_address=localhost:23456",
                                "--num_processes=2", f"--process_id={pid}", "--config.x=1"]
    assert os.path.isdir(tmp_path / "run" / "logs")  # process 1's output goes there


def test_a_failed_process_stops_a_stuck_peer_with_sigkill(tmp_path):
    proc, log = start(tmp_path, _0="stuck", _1="fail")
    started = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err  # the failed process's status
    assert "did not stop within 2s; killing it" in err
    assert time.time() - started < 30


def test_sigterm_to_the_script_lets_every_process_save(tmp_path):
    proc, log = start(tmp_path, _0="train", _1="train")
    deadline = time.time() + 30
    while not (log.exists() and len(records(log)) == 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert sorted(line for line in log.read_text().splitlines() if "saved" in line) == ["0 saved", "1 saved"]
