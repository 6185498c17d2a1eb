"""Training metrics: TensorBoard through clu when it imports, and always DIR/metrics.jsonl.

clu's writers import tensorflow; on machines without it (accelerator images often lack it),
metrics still go to metrics.jsonl and the log.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Writes scalars per logged step. Only process 0 writes files; the others only log."""

    def __init__(self, workdir: str, num_steps: int, every_steps: int):
        self.is_main = jax.process_index() == 0
        self._jsonl = None
        self._writer = None
        self._progress = None
        if self.is_main:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)
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
