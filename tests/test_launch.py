"""launch/local_multigpu.sh with a stub interpreter on PATH that records what it is started with:
the per-process flags and environment, and how the script stops its processes (SIGTERM, then
SIGKILL after GRACE_SECONDS for a process stuck in a collective); slurm_gpu.sbatch and tpu_pod.sh
with stub srun / scontrol / gcloud: their arguments, and when they requeue or rerun a job."""

import os
import signal
import subprocess
import time

import pytest

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


# A stub `srun`: records its arguments, then starts SLURM_NTASKS local copies of the command with
# the variables a real srun task has (JAX's SLURM detection reads them).
SRUN = r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=localhost "$@" > "$STUB_DIR/task$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""


def test_slurm_script_trains_two_tasks_through_jax_slurm_detection(tmp_path):
    import json
    import random
    import sys

    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(SRUN)
    (stubs / "srun").chmod(0o755)
    log = tmp_path / "srun.log"
    workdir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "STUB_DIR": str(tmp_path), "WORKDIR": str(workdir), "CONFIG": "configs/tiny.py",
           "PYTHON": sys.executable, "PYTHONPATH": ROOT, "REPO_DIR": ROOT,
           "SLURM_JOB_ID": str(random.randint(1000, 9000)), "SLURM_NTASKS": "2",
           "SLURM_CPUS_PER_TASK": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
    for key in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "FVDM_DISTRIBUTED"):
        env.pop(key, None)
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch"),
                           "--config.train.num_steps=3", "--config.train.log_every_steps=1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    tasks = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
    assert done.returncode == 0, done.stderr[-2000:] + tasks[0][-2000:] + tasks[1][-2000:]
    recorded = log.read_text()
    assert "--kill-on-bad-exit=1" in recorded and "--cpus-per-task=1" in recorded
    assert f"-m fvdm_jax.main --config=configs/tiny.py --workdir={workdir}" in recorded
    # Both tasks joined one 2-process job (FVDM_DISTRIBUTED=1 from the script, JAX's SLURM
    # cluster detection for the coordinator and ranks) and trained 3 steps on 8 devices.
    assert "jax.distributed (forced): process 1/2" in tasks[1]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]


# A stub `gcloud` standing in for a 2-worker TPU VM: `ssh --worker=all --command=C` runs C on
# each worker, `scp --recurse --worker=all SRC NAME:~/` copies SRC there; a worker is a folder
# used as HOME. The job's interpreter (~/fvdm_venv/bin/python) is a stub that records how it
# was started.
GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
command=""; args=()
for a in "$@"; do case "$a" in --command=*) command="${a#--command=}";; *) args+=("$a");; esac; done
for ((w = 0; w < 2; w++)); do
  home="$STUB_DIR/worker$w"; mkdir -p "$home"
  if [[ " $* " == *" scp "* ]]; then
    src="${args[-2]}"; cp -r "$src" "$home/"
  elif [[ -n "$command" ]]; then
    (cd "$home" && HOME="$home" WORKER=$w bash -c "$command") || exit $?
  fi
done
"""
PYTHON_STUB = r"""#!/usr/bin/env bash
echo "worker=$WORKER pwd=$PWD FVDM_DISTRIBUTED=$FVDM_DISTRIBUTED args=$*" >> "$STUB_DIR/job.log"
"""


def _tpu_hosts(tmp_path, python_stub: str):
    """A stub gcloud on PATH (bin/) and, on each of 2 workers, the virtualenv an earlier launch
    left there, whose python is `python_stub`; returns the bin folder."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "gcloud").write_text(GCLOUD)
    (stubs / "gcloud").chmod(0o755)
    for w in range(2):
        venv = tmp_path / f"worker{w}" / "fvdm_venv" / "bin"
        venv.mkdir(parents=True)
        (venv / "python").write_text(python_stub)
        (venv / "python").chmod(0o755)
    return stubs


def test_tpu_pod_script_copies_and_starts_the_job_on_every_worker(tmp_path):
    stubs = _tpu_hosts(tmp_path, PYTHON_STUB)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "gcloud.log"),
           "STUB_DIR": str(tmp_path), "TPU_NAME": "fvdm-v5p-16", "ZONE": "us-east5-a",
           "PROJECT": "my-project", "WORKDIR": "gs://bucket/runs/ffs xl", "SKIP_INSTALL": "1"}
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"),
                           "--config.train.batch_size=64", "--config.sample.labels=1,2 3"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert all("fvdm-v5p-16" in c and "--zone=us-east5-a" in c and "--project=my-project" in c
               for c in calls)
    assert any(c.startswith("compute tpus tpu-vm scp --recurse --worker=all") for c in calls)
    for w in range(2):  # the repository reached every worker, without .git
        copy = tmp_path / f"worker{w}" / "fvdm_jax"
        assert (copy / "fvdm_jax" / "main.py").is_file() and not (copy / ".git").exists()
    jobs = (tmp_path / "job.log").read_text().splitlines()
    assert len(jobs) == 2 and {j.split()[0] for j in jobs} == {"worker=0", "worker=1"}
    for job in jobs:
        assert "FVDM_DISTRIBUTED=1 " in job and job.split()[1].endswith("/fvdm_jax")
        # The arguments arrive intact through two shells (spaces included).
        assert job.endswith("args=-m fvdm_jax.main --config=configs/ffs_xl.py --workdir=gs://bucket/runs/ffs xl "
                            "--config.train.batch_size=64 --config.sample.labels=1,2 3")


# The requeue decision of slurm_gpu.sbatch: a stub `srun` that runs the command once, a stub
# interpreter that exits STUB_EXIT, and a stub `scontrol` that records the requeue.
SRUN_ONCE = r"""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
"$@"
"""
EXITS = r"""#!/usr/bin/env bash
exit "$STUB_EXIT"
"""
SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
"""


@pytest.mark.parametrize("code, restarts, requeued", [
    (143, 0, True), (143, 7, True),  # preempted (every process saved): always
    (75, 0, True), (134, 1, True), (137, 2, True),  # a process was lost: at most 3 times in all
    (75, 3, False),
    (130, 0, False), (0, 0, False), (1, 0, False),  # Ctrl-C, finished, a failure to look at
])
def test_slurm_script_requeues_a_preempted_or_lost_job(tmp_path, code, restarts, requeued):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN_ONCE), ("scontrol", SCONTROL), ("python", EXITS)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "STUB_EXIT": str(code), "WORKDIR": str(tmp_path / "run"), "PYTHON": str(stubs / "python"),
           "REPO_DIR": ROOT, "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": str(restarts)}
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr  # the job's status is the processes'
    calls = log.read_text().splitlines() if log.exists() else []
    assert calls == (["scontrol requeue 4242"] if requeued else []), done.stdout
    if code == 75 and not requeued:
        assert "already been restarted 3 times (FVDM_MAX_RESTARTS=3): not requeueing" in done.stdout


# The job on a TPU host exits with the codes of STUB_EXITS in turn (one per start, per worker);
# the script reruns it on the restartable ones.
PYTHON_EXITS = r"""#!/usr/bin/env bash
n=$(cat "$HOME/starts" 2>/dev/null || echo 0); echo $((n + 1)) > "$HOME/starts"
echo "worker=$WORKER start=$((n + 1)) FVDM_PEER_TIMEOUT_S=$FVDM_PEER_TIMEOUT_S args=$*" >> "$STUB_DIR/job.log"
codes=($STUB_EXITS); exit "${codes[$n]:-0}"
"""


@pytest.mark.parametrize("exits, max_restarts, status, starts", [
    ("143 0", 3, 0, 2),  # preempted: rerun, resumes, finishes
    ("75 137 0", 3, 0, 3),  # a lost process, then a killed one
    ("75 75 75", 1, 75, 2),  # gives up after MAX_RESTARTS reruns
    ("143 0", 0, 143, 1),  # MAX_RESTARTS=0: never
    ("130 0", 3, 130, 1),  # Ctrl-C: the user stopped it
    ("1 0", 3, 1, 1),  # a failure to look at
])
def test_tpu_pod_script_reruns_a_preempted_or_lost_job(tmp_path, exits, max_restarts, status, starts):
    stubs = _tpu_hosts(tmp_path, PYTHON_EXITS)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "gcloud.log"),
           "STUB_DIR": str(tmp_path), "TPU_NAME": "fvdm-v5p-16", "ZONE": "us-east5-a",
           "WORKDIR": "gs://bucket/run", "SKIP_INSTALL": "1", "SKIP_COPY": "1", "STUB_EXITS": exits,
           "MAX_RESTARTS": str(max_restarts), "RESTART_DELAY": "0", "FVDM_PEER_TIMEOUT_S": "30"}
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--config.x=1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr[-3000:]
    jobs = [line for line in (tmp_path / "job.log").read_text().splitlines() if line.startswith("worker=0")]
    assert [j.split()[1] for j in jobs] == [f"start={i + 1}" for i in range(starts)], done.stderr
    assert all(j.endswith("FVDM_PEER_TIMEOUT_S=30 args=-m fvdm_jax.main --config=configs/ffs_xl.py "
                          "--workdir=gs://bucket/run --config.x=1") for j in jobs), jobs
    if starts > 1:
        assert "resuming from the newest checkpoint" in done.stderr
