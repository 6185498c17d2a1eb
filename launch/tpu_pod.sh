#!/usr/bin/env bash
# Train (or sample / evaluate) fvdm_jax on every host of a Cloud TPU VM pod slice.
#
# Usage (from anywhere; arguments after the script go to fvdm_jax.main on every host):
#   TPU_NAME=fvdm-v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/ffs_xl \
#     launch/tpu_pod.sh --config.train.batch_size=64
#
# What it does, on ALL workers (gcloud --worker=all):
#   1. copies this repository (without .git and build leftovers) to ~/$REMOTE_DIR,
#   2. creates a virtualenv and installs requirements.txt, the package, and jax[tpu] at the
#      version pinned in requirements.txt,
#   3. runs: python -m fvdm_jax.main --config=$CONFIG --workdir=$WORKDIR "$@", and reruns it on
#      that host (it resumes from the newest checkpoint) when it stopped with 143 (SIGTERM: every
#      host saved the same step), 75 (another host's process was lost; nothing saved since the
#      newest checkpoint), 134 or 137 (a process aborted or was killed; a dead process 0 makes
#      JAX abort the others from C++), at most MAX_RESTARTS times. 0, 130 (Ctrl-C) and other
#      failures end the job.
# The job runs with FVDM_DISTRIBUTED=1, so main.py calls jax.distributed.initialize() on every
# host (TPU VMs often leave TPU_WORKER_HOSTNAMES unset; JAX then reads the coordinator, the process
# count and the process id from the GCE metadata), so no distributed flags are passed.
#
# Variables (environment):
#   TPU_NAME       required  name of the TPU VM (pod slice), as in `gcloud compute tpus tpu-vm list`
#   ZONE           required  its zone
#   WORKDIR        required  checkpoints, logs and samples. It MUST be the same path on every
#                            host: a gs:// bucket (orbax and the metric writers read/write GCS
#                            directly) or a filesystem mounted on all hosts. A local path would
#                            give each host its own, inconsistent checkpoint directory.
#   CONFIG         configs/ffs_xl.py   config file, relative to the repository root (a
#                            ':variant' suffix is passed through)
#   PROJECT        (gcloud default)     Google Cloud project of the TPU
#   REMOTE_DIR     fvdm_jax             where the repository lands, relative to each host's home
#   REMOTE_PYTHON  python3              interpreter on the hosts used to create the virtualenv;
#                            fvdm_jax needs Python >= 3.11, and some TPU VM images ship 3.10:
#                            point this at a 3.11+ interpreter there
#   REMOTE_VENV    fvdm_venv            virtualenv on the hosts, relative to home; kept between
#                            launches, so reinstalls are quick
#   JAX_TPU_SPEC   jax[tpu]==<the jax version pinned in requirements.txt>
#                            what to pip install for TPU support (libtpu comes from PyPI)
#   SKIP_COPY      0                    1: do not copy the repository (it is already there)
#   SKIP_INSTALL   0                    1: do not create the virtualenv / pip install
#   DETACH         0                    1: start the job under nohup on every host and return;
#                            its output goes to ~/$REMOTE_DIR/run.log on each host. Otherwise
#                            the job runs in the foreground and dies if this ssh session does.
#   GCLOUD_FLAGS   (empty)              extra flags for every `gcloud compute tpus tpu-vm` call,
#                            e.g. "--internal-ip" or "--tunnel-through-iap"
#   MAX_RESTARTS   3                    reruns per host after 143 / 75 / 134 / 137 (0: none)
#   RESTART_DELAY  10                   seconds before a rerun (the other hosts' processes end too)
#   FVDM_PEER_TIMEOUT_S  60             seconds without a heartbeat after which a process counts
#                            as dead (passed on to the job when set)
#
# A previous run that did not exit keeps the TPU busy ("TPU in use"); find it on the hosts
# with `sudo lsof -w /dev/accel*` (or /dev/vfio/* on newer TPUs) and end that process.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
: "${WORKDIR:?set WORKDIR to a path shared by all hosts, e.g. gs://bucket/run}"
CONFIG="${CONFIG:-configs/ffs_xl.py}"
PROJECT="${PROJECT:-}"
REMOTE_DIR="${REMOTE_DIR:-fvdm_jax}"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3}"
REMOTE_VENV="${REMOTE_VENV:-fvdm_venv}"
SKIP_COPY="${SKIP_COPY:-0}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
DETACH="${DETACH:-0}"
GCLOUD_FLAGS="${GCLOUD_FLAGS:-}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
RESTART_DELAY="${RESTART_DELAY:-10}"
if [[ ! "$MAX_RESTARTS" =~ ^[0-9]+$ || ! "$RESTART_DELAY" =~ ^[0-9]+$ ]]; then
  echo "MAX_RESTARTS=$MAX_RESTARTS and RESTART_DELAY=$RESTART_DELAY must be whole numbers" >&2
  exit 2
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${JAX_TPU_SPEC:-}" ]]; then
  # One source of truth for the jax version: the pin in requirements.txt.
  jax_version="$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' "$REPO_ROOT/requirements.txt")"
  : "${jax_version:?requirements.txt has no jax==VERSION pin; set JAX_TPU_SPEC}"
  JAX_TPU_SPEC="jax[tpu]==${jax_version}"
fi
if [[ "$WORKDIR" != gs://* ]]; then
  echo "note: WORKDIR=$WORKDIR is not a gs:// path; it must be a filesystem shared by all hosts" >&2
fi

gcloud_flags=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && gcloud_flags+=(--project="$PROJECT")
if [[ -n "$GCLOUD_FLAGS" ]]; then
  read -r -a extra_flags <<<"$GCLOUD_FLAGS"
  gcloud_flags+=("${extra_flags[@]}")
fi

on_all_workers() {  # $1: a bash command line run in each host's home directory
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_flags[@]}" --command="$1"
}

if [[ "$SKIP_COPY" != 1 ]]; then
  # Stage a clean copy so that .git, caches and local virtualenvs do not travel to every host.
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' EXIT
  mkdir "$stage/$REMOTE_DIR"
  tar -C "$REPO_ROOT" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=.venv --exclude=venv -cf - . | tar -C "$stage/$REMOTE_DIR" -xf -
  # scp --recurse into an existing directory would nest it: remove the old copy first.
  on_all_workers "rm -rf ~/$(printf %q "$REMOTE_DIR")"
  gcloud compute tpus tpu-vm scp --recurse --worker=all "${gcloud_flags[@]}" \
    "$stage/$REMOTE_DIR" "$TPU_NAME:~/"
fi

q_dir="$(printf %q "$REMOTE_DIR")"
q_venv="$(printf %q "$REMOTE_VENV")"

if [[ "$SKIP_INSTALL" != 1 ]]; then
  on_all_workers "set -euo pipefail; cd ~/$q_dir
    [[ -x ~/$q_venv/bin/python ]] || $(printf %q "$REMOTE_PYTHON") -m venv ~/$q_venv
    ~/$q_venv/bin/python -m pip install -q --upgrade pip
    ~/$q_venv/bin/python -m pip install -q -r requirements.txt
    ~/$q_venv/bin/python -m pip install -q $(printf %q "$JAX_TPU_SPEC")
    ~/$q_venv/bin/python -m pip install -q --no-deps -e ."
fi

# The job's command line, quoted once for the remote shell.
# shellcheck disable=SC2088  # the ~ is expanded by the remote shell, on purpose
job="FVDM_DISTRIBUTED=1"
if [[ -n "${FVDM_PEER_TIMEOUT_S:-}" ]]; then
  job+=" FVDM_PEER_TIMEOUT_S=$(printf %q "$FVDM_PEER_TIMEOUT_S")"
fi
job+=" ~/$q_venv/bin/python -m fvdm_jax.main"
job+=" $(printf %q "--config=$CONFIG") $(printf %q "--workdir=$WORKDIR")"
for arg in "$@"; do
  job+=" $(printf %q "$arg")"
done
# On each host: run the job, and rerun it (it resumes) after a preemption or a lost process.
run="restarts=0; while true; do $job; status=\$?"
run+="; case \$status in 143 | 75 | 134 | 137) ;; *) exit \$status ;; esac"
run+="; if ((restarts >= $MAX_RESTARTS)); then echo \"fvdm_jax: exit \$status after \$restarts"
run+=" restarts (MAX_RESTARTS=$MAX_RESTARTS): giving up\" >&2; exit \$status; fi"
run+="; restarts=\$((restarts + 1)); echo \"fvdm_jax: exit \$status (preempted, or a process was"
run+=" lost); rerun \$restarts of $MAX_RESTARTS in ${RESTART_DELAY}s, resuming from the newest"
run+=" checkpoint\" >&2; sleep $RESTART_DELAY; done"

if [[ "$DETACH" == 1 ]]; then
  on_all_workers "cd ~/$q_dir && nohup bash -c $(printf %q "$run") > run.log 2>&1 < /dev/null &"
  echo "started on every worker of $TPU_NAME; logs: ~/$REMOTE_DIR/run.log on each host"
else
  on_all_workers "cd ~/$q_dir && $run"
fi
