"""Where FVD results go: one JSON line per result in WORKDIR/eval.jsonl, TensorBoard scalars."""

from __future__ import annotations

import json

import jax

from fvdm_jax.runtime import files, metrics

EVAL_FILE = "eval.jsonl"


class EvalResult(dict):
    """The record of one evaluation; printed as one JSON line."""

    def __str__(self) -> str:
        return json.dumps(self, sort_keys=True)


def latest_checkpoint_step(workdir: str) -> int:
    folder = files.join(workdir, "checkpoints")
    steps = [int(n) for n in files.listdir(folder) if n.isdigit()] if files.isdir(folder) else []
    return max(steps, default=0)


def append_record(workdir: str, record: dict) -> None:
    """One JSON line in WORKDIR/eval.jsonl (process 0)."""
    if jax.process_index() != 0:
        return
    files.makedirs(workdir)
    path = files.join(workdir, EVAL_FILE)
    if files.is_url(path):  # object stores cannot append
        old = files.open_file(path).read() if files.isfile(path) else ""
        files.write_text(path, old + json.dumps(record, sort_keys=True) + "\n")
        return
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def write_tensorboard(workdir: str, step: int, scalars: dict) -> bool:
    """TensorBoard scalars through clu when it imports (it needs tensorflow), on process 0;
    False otherwise (FVD is in eval.jsonl either way)."""
    writer = metrics.tensorboard_writer(workdir, fallback=EVAL_FILE)
    if writer is None:
        return False
    writer.write_scalars(step, scalars)
    writer.flush()
    writer.close()
    return True
