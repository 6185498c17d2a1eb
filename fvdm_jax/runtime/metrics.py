"""Training metrics and their plots: DIR/metrics.jsonl always, TensorBoard through clu when it
imports, and DIR/plots/ (loss.png; fvd.png once FVD ran during training).

clu's writers import tensorflow; on machines without it (accelerator images often lack it),
metrics still go to metrics.jsonl. Only the TensorBoard writer of clu is used: the console line
of a log step is the loop's own (fvdm_jax/runtime/console.py), never repeated by clu's logging writer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping

import jax
import numpy as np

from fvdm_jax.runtime import files

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
LOSS_PLOT = os.path.join(PLOTS_DIR, "loss.png")
FVD_PLOT = os.path.join(PLOTS_DIR, "fvd.png")
FVD_KEY = re.compile(r"^fvd\d+_\d+f(_\w+)?$")  # fvd64_16f, fvd2048_16f_i2v: FVD scalars


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
    """'a'-mode writes to a URL (object stores cannot append): rows are kept in memory and the
    whole file is rewritten at most every `every_sec` seconds and at close, so a long run costs
    a bounded number of uploads, not one per logged step."""

    def __init__(self, path: str, every_sec: float = 60.0):
        self.path = path
        self.every_sec = float(every_sec)
        self.text = ""
        self._written = time.monotonic()
        if files.isfile(path):
            with files.open_file(path) as f:
                self.text = f.read()

    def write(self, text: str) -> None:
        self.text += text
        if time.monotonic() - self._written >= self.every_sec:
            self.flush()

    def flush(self) -> None:
        files.write_text(self.path, self.text)
        self._written = time.monotonic()

    def close(self) -> None:
        self.flush()



def tensorboard_writer(workdir: str, fallback: str = METRICS_FILE):
    """clu's asynchronous TensorBoard writer for `workdir` on process 0 (no logging writer: the
    console shows fvdm_jax's own line); None on other processes or where clu / tensorflow do
    not import or the writer cannot start (a warning naming `fallback`, the file that has it all)."""
    if jax.process_index() != 0:
        return None
    try:
        from clu import metric_writers

        return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(files.resolve(workdir))])
    except ImportError as e:  # no tensorflow/clu on this machine
        logging.warning("clu writers unavailable (%s); logging to %s only", e, fallback)
    except Exception as e:  # noqa: BLE001 - e.g. a full disk: TensorBoard is not worth a crash
        logging.warning("TensorBoard writer unavailable (%s); logging to %s only", e, fallback)
    return None


class MetricsLogger:
    """Writes scalars per logged step to metrics.jsonl and TensorBoard. Only process 0 writes;
    the console line is not this class's (see fvdm_jax/runtime/console.py)."""

    def __init__(self, workdir: str, start_step: int = 0):
        """start_step: the step training resumes from; rows of later steps (written before a crash,
        now trained again) are dropped from metrics.jsonl, so every step appears once."""
        self.is_main = jax.process_index() == 0
        self._jsonl = None
        if self.is_main:
            files.makedirs(workdir)
            path = files.join(workdir, METRICS_FILE)
            _drop_rows_after(path, start_step)
            # A bucket has no appends: rows are rewritten there every minute and at close.
            self._jsonl = open(path, "a", buffering=1) if not files.is_url(path) else _UrlAppender(path)
        self._writer = tensorboard_writer(workdir)
        self._last_time = None
        self._last_step = None

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are being written."""
        return self._writer is not None

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


# ---------------------------------------------------------------------------------------------
# Reading the rows back, and the plots.


def read_rows(workdir: str) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl in step order; the rows of one step merged (the loop
    writes the log scalars and each action's scalars as separate rows), a later value winning
    (a step re-run after a restart). A torn last line is skipped."""
    path = files.join(workdir, METRICS_FILE)
    if not files.isfile(path):
        return []
    rows: dict[int, dict] = {}
    with files.open_file(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            rows.setdefault(step, {}).update(row)
    return [rows[step] for step in sorted(rows)]


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: no global state, safe beside a training loop

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    figure.subplots_adjust(left=0.13, right=0.97, top=0.92, bottom=0.12)
    axis = figure.add_subplot()
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.grid(True, which="both", alpha=0.3)
    return figure, axis


def _save(figure, path: str) -> str:
    files.makedirs(os.path.dirname(path) or ".")
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary)
    return path


def _title(workdir: str) -> str:
    return os.path.basename(os.path.normpath(str(workdir))) or str(workdir)


def _plottable() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        logging.warning("no plots (%s): pip install matplotlib", error)
        return False
    return True


def plot_loss(workdir: str, path: str | None = None, rows: list[dict] | None = None) -> str | None:
    """Writes the loss curve (loss, mse, vb vs step, log y) to `path` (WORKDIR/plots/loss.png)
    and returns it; None when there is nothing to plot or matplotlib is missing (logged)."""
    rows = [r for r in (read_rows(workdir) if rows is None else rows) if "loss" in r]
    if not rows or not _plottable():
        return None
    figure, axis = _figure(_title(workdir), "training loss (mean over the log interval)")
    steps = [r["step"] for r in rows]
    for key, style in (("loss", "-"), ("mse", "--"), ("vb", ":")):
        values = [r.get(key) for r in rows]
        if all(v is not None and v > 0 for v in values):
            axis.plot(steps, values, style, label=key)
    axis.set_yscale("log")
    axis.legend()
    return _save(figure, path or files.join(workdir, LOSS_PLOT))


def fvd_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{FVD key: (steps, values)} of the rows' FVD scalars (keys matching FVD_KEY)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if FVD_KEY.match(key) and value is not None and np.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(row["step"]))
                values.append(float(value))
    return series


def plot_fvd(workdir: str, current: Mapping[int, Mapping[str, float]] | None = None,
             path: str | None = None) -> str | None:
    """Writes FVD vs step (one line per FVD metric of metrics.jsonl; log y where the values span
    more than a decade) to `path` (WORKDIR/plots/fvd.png) and returns it; None when no FVD ran
    during training.
    current: {step: {key: fvd}} not written to metrics.jsonl yet (the value just computed)."""
    rows = read_rows(workdir)
    by_step = {int(r["step"]): dict(r) for r in rows}
    for step, scalars in (current or {}).items():
        by_step.setdefault(int(step), {"step": int(step)}).update(scalars)
    series = fvd_series([by_step[s] for s in sorted(by_step)])
    if not series or not _plottable():
        return None
    figure, axis = _figure(_title(workdir), "FVD (lower is better)")
    for key, (steps, values) in sorted(series.items()):
        axis.plot(steps, values, "o-", label=key)
    values = [v for _, vs in series.values() for v in vs]
    if min(values) > 0 and max(values) > 10 * min(values):  # log only where it spans a decade
        axis.set_yscale("log")
    axis.legend()
    return _save(figure, path or files.join(workdir, FVD_PLOT))


def write_plots(workdir: str) -> list[str]:
    """plots/loss.png, and plots/fvd.png when FVD ran, from metrics.jsonl (process 0); a plot
    that fails is a warning, never the end of a run. Returns the paths written."""
    if jax.process_index() != 0:
        return []
    written = []
    for plot in (plot_loss, plot_fvd):
        try:
            path = plot(workdir)
        except Exception as error:  # noqa: BLE001 - a figure is not worth a crashed run
            logging.warning("%s failed (%s); training goes on", plot.__name__, error)
            continue
        if path:
            written.append(path)
    return written
