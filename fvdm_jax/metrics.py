"""Training metrics: TensorBoard through clu when it imports, and always DIR/metrics.jsonl.

clu's writers import tensorflow; on machines without it (accelerator images often lack it),
metrics still go to metrics.jsonl and the log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping

import jax
import numpy as np

from fvdm_jax import files

METRICS_FILE = "metrics.jsonl"


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites metrics.jsonl without rows of steps > `step` (atomically; a no-op if none)."""
    if not files.isfile(path):
        return
    with files.open_file(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if _row_step(line) <= step]
    if len(keep) == len(lines):
        return
    files.write_text(path, "".join(keep))
    logging.info("%s: dropped %d rows of steps after %d (trained again now)", path,
                 len(lines) - len(keep), step)


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # a torn last line of a crash: dropped with the rows after `step`


class _UrlAppender:
    """'a'-mode writes to a URL (object stores cannot append): the whole file is rewritten on
    each flush, which happens at every logged step (small: one row per log interval)."""

    def __init__(self, path: str):
        self.path = path
        self.text = ""
        if files.isfile(path):
            with files.open_file(path) as f:
                self.text = f.read()

    def write(self, text: str) -> None:
        self.text += text
        files.write_text(self.path, self.text)

    def close(self) -> None:
        pass


class MetricsLogger:
    """Writes scalars per logged step. Only process 0 writes files; the others only log."""

    def __init__(self, workdir: str, num_steps: int, every_steps: int, start_step: int = 0):
        """start_step: the step training resumes from; rows of later steps (written before a crash,
        now trained again) are dropped from metrics.jsonl, so every step appears once."""
        self.is_main = jax.process_index() == 0
        self._jsonl = None
        self._writer = None
        self._progress = None
        if self.is_main:
            files.makedirs(workdir)
            path = files.join(workdir, METRICS_FILE)
            _drop_rows_after(path, start_step)
            # A bucket has no appends: rows go to a local buffer file, copied up at close.
            self._jsonl = open(path, "a", buffering=1) if not files.is_url(path) else _UrlAppender(path)
        try:
            from clu import metric_writers, periodic_actions

            self._writer = metric_writers.create_default_writer(
                workdir, just_logging=not self.is_main
            )
            # No writer: the loop's own steps_per_sec is the one written (not a second copy).
            self._progress = periodic_actions.ReportProgress(
                num_train_steps=num_steps, writer=None, every_steps=every_steps
            )
        except ImportError as e:  # no tensorflow/clu on this machine
            logging.warning("clu writers unavailable (%s); logging to %s only", e, METRICS_FILE)
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: TensorBoard is not worth a crash
            logging.warning("TensorBoard writer unavailable (%s); logging to %s only", e, METRICS_FILE)
            self._writer = self._progress = None
        self._last_time = None
        self._last_step = None

    def tick(self, step: int):
        """Per-step hook (cheap: no device sync); drives clu's progress/ETA report."""
        if self._progress is not None:
            self._progress(step)

    def rates(self, step: int) -> dict:
        """Steps/s since the previous call (wall clock, the caller has synced)."""
        now = time.perf_counter()
        out = {}
        if self._last_time is not None and step > self._last_step:
            out["steps_per_sec"] = (step - self._last_step) / (now - self._last_time)
        self._last_time, self._last_step = now, step
        return out

    def write(self, step: int, scalars: Mapping[str, float]):
        scalars = {k: float(v) for k, v in scalars.items()}
        logging.info(
            "step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(scalars.items()))
        )
        if self._writer is not None:
            self._writer.write_scalars(step, scalars)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")

    def write_images(self, step: int, images: Mapping[str, np.ndarray]):
        """uint8 (H, W, 3) images (e.g. sample contact sheets) to TensorBoard; nothing without clu."""
        if self._writer is not None:
            self._writer.write_images(step, {k: np.asarray(v)[None] for k, v in images.items()})
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
