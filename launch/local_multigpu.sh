#!/usr/bin/env bash
# fvdm_jax on the GPUs of one machine.
#
# Usage:
#   launch/local_multigpu.sh CONFIG WORKDIR [more fvdm_jax.main flags...]
#   launch/local_multigpu.sh configs/ffs_xl.py /data/runs/ffs_xl --config.train.batch_size=8
#   NUM_PROCESSES=4 launch/local_multigpu.sh configs/ffs_xl.py /data/runs/ffs_xl
#
# Default (NUM_PROCESSES unset or 1): ONE process drives every visible GPU. This is the simplest
# and usual way in JAX: the mesh spans all local devices and no distributed setup is needed.
#
# NUM_PROCESSES=N (N > 1): N processes, process i pinned to one GPU through
# CUDA_VISIBLE_DEVICES, joined by jax.distributed through the flags
#   --coordinator_address=localhost:$COORDINATOR_PORT --num_processes=N --process_id=i
# which main.py passes to jax.distributed.initialize(). This rehearses a multi-host run on one
# machine. The script waits for all of them; when one fails it ends the others (they would
# otherwise wait forever in a collective) and exits with the failed process's status.
# Exit statuses (the same on every launch): 0 finished; 143 SIGTERM / 130 Ctrl-C, on any one
# process: all of them stopped after the same step and saved it; 75 a process lost a peer
# (killed, crashed) and stopped without saving. After 143 and 75, rerun the same command: it
# resumes from the newest finished checkpoint.
# Process 0 prints to this terminal; process i > 0 writes to $LOG_DIR/process_i.log.
#
# Variables (environment):
#   NUM_PROCESSES     1                        processes to start (at most one per GPU)
#   GPUS              $CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists
#                                              comma-separated GPU ids to use
#   COORDINATOR_PORT  12355                    free local TCP port for process 0's coordinator
#   LOG_DIR           $WORKDIR/logs if WORKDIR is local, else ./logs
#                                              where processes 1..N-1 write their output
#   PYTHON            python                   the interpreter (activate your virtualenv first)
#   GRACE_SECONDS     60                       after a failure or a signal: how long the other
#                                              processes get to save and exit before SIGKILL
set -euo pipefail

if (($# < 2)); then
  echo "usage: $0 CONFIG WORKDIR [fvdm_jax.main flags...]" >&2
  exit 2
fi
CONFIG="$1"
WORKDIR="$2"
shift 2
NUM_PROCESSES="${NUM_PROCESSES:-1}"
COORDINATOR_PORT="${COORDINATOR_PORT:-12355}"
PYTHON="${PYTHON:-python}"

main=("$PYTHON" -m fvdm_jax.main --config="$CONFIG" --workdir="$WORKDIR")

if [[ ! "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES=$NUM_PROCESSES must be a positive integer" >&2
  exit 2
fi
if ((NUM_PROCESSES == 1)); then
  exec "${main[@]}" "$@"
fi

if [[ -z "${GPUS:-}" ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    GPUS="$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null; then
    GPUS="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
  else
    echo "cannot list the GPUs (no CUDA_VISIBLE_DEVICES, no nvidia-smi); set GPUS=0,1,..." >&2
    exit 2
  fi
fi
IFS=, read -r -a gpu_ids <<<"$GPUS"
if ((NUM_PROCESSES > ${#gpu_ids[@]})); then
  echo "NUM_PROCESSES=$NUM_PROCESSES needs one GPU each but GPUS=$GPUS has ${#gpu_ids[@]}" >&2
  exit 2
fi

if [[ -z "${LOG_DIR:-}" ]]; then
  if [[ "$WORKDIR" == *://* ]]; then LOG_DIR=logs; else LOG_DIR="$WORKDIR/logs"; fi
fi
mkdir -p "$LOG_DIR"

pids=()
GRACE_SECONDS="${GRACE_SECONDS:-60}"
stop_all() {
  # SIGTERM to the processes still running: each saves a checkpoint at its next step boundary
  # and exits 143. A process stuck in a collective whose peer died never reaches a step
  # boundary, so whatever still runs after GRACE_SECONDS gets SIGKILL.
  local pid alive waited=0
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  while ((waited < GRACE_SECONDS)); do
    alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || return 0
    sleep 1
    waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "process $pid did not stop within ${GRACE_SECONDS}s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}
on_signal() {  # Ctrl-C / SIGTERM to this script: the processes save and stop, then exit $1
  echo "stopping: every process saves and exits (SIGKILL after ${GRACE_SECONDS}s)" >&2
  stop_all
  wait || true
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  flags=(--coordinator_address="localhost:$COORDINATOR_PORT" --num_processes="$NUM_PROCESSES"
    --process_id="$i")
  # Each process sees exactly one GPU, which it calls device 0. JAX_LOCAL_DEVICE_IDS=0 keeps
  # jax.distributed from choosing a device by a SLURM_LOCALID it might inherit (a shell inside
  # an salloc / sbatch allocation).
  if ((i == 0)); then
    CUDA_VISIBLE_DEVICES="${gpu_ids[i]}" JAX_LOCAL_DEVICE_IDS=0 \
      "${main[@]}" "${flags[@]}" "$@" &
  else
    CUDA_VISIBLE_DEVICES="${gpu_ids[i]}" JAX_LOCAL_DEVICE_IDS=0 \
      "${main[@]}" "${flags[@]}" "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
echo "started $NUM_PROCESSES processes on GPUs ${gpu_ids[*]:0:NUM_PROCESSES};" \
  "logs of processes 1..$((NUM_PROCESSES - 1)) in $LOG_DIR" >&2

# Wait for each process in turn as they finish (wait -n), and stop at the first failure.
status=0
for ((remaining = NUM_PROCESSES; remaining > 0; remaining--)); do
  wait -n || status=$?
  if ((status != 0)); then
    echo "a process failed with status $status; stopping the others" >&2
    stop_all
    wait || true
    exit "$status"
  fi
done
