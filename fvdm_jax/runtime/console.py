"""What a run shows on the console: log levels, progress, the start banner and the end summary.

- Log levels (`configure_logging`, called by fvdm_jax/main.py before JAX or TensorFlow load):
  by default fvdm_jax's own INFO lines, and warnings and errors of everything, are shown; the
  INFO chatter of third-party libraries (orbax's per-save lines, absl, clu, grain, JAX's backend
  probes, TensorFlow's C++ notices through TF_CPP_MIN_LOG_LEVEL) is not. Level 'info' shows it
  again, 'debug' shows everything.
- Progress (process 0 only): a tqdm bar on a terminal; periodic plain lines where the console
  is a file (no TTY, CI, SLURM logs), so logs never fill with bar redraws. `console.progress`
  (auto / bar / plain / off) and `console.plain_every_sec` in the config choose.
- Training shows one line per log interval (`TrainProgress`), the same line in both modes.
- `banner` and `summary`: a few aligned `name  value` rows at the start and the end of a run.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

LOG_LEVELS = ("warning", "info", "debug")
PROGRESS_MODES = ("auto", "bar", "plain", "off")

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fvdm_jax/
# Third-party lines that say nothing about the run, hidden at the default level even as
# warnings: JAX's backend probe where that accelerator is absent (libtpu installed on a CPU or
# GPU host; a backend that is asked for and fails raises instead), and orbax's notices that a
# checkpoint folder opened read-only (sampling, evaluation, export) is read-only.
PROBE_NOISE = ("Unable to initialize backend", "CheckpointManagerOptions.read_only=True",
               "Given directory is read only")

_settings = {"progress": "auto", "plain_every_sec": 60.0}
_live_bars: set = set()  # tqdm bars of this module now on screen (log lines go above them)


# ---------------------------------------------------------------------------------------------
# Log levels.


def is_ours(record: logging.LogRecord) -> bool:
    """A record logged by fvdm_jax (python loggers named fvdm_jax.*, or absl / root logging
    called from a file of the package)."""
    return record.name.startswith("fvdm_jax") or os.path.abspath(record.pathname).startswith(PACKAGE_DIR)


class QuietThirdParty(logging.Filter):
    """Passes warnings and errors, and fvdm_jax's own lines; drops third-party INFO and DEBUG
    and the lines of PROBE_NOISE."""

    def filter(self, record: logging.LogRecord) -> bool:
        if any(text in str(record.msg) for text in PROBE_NOISE):
            return False
        return record.levelno >= logging.WARNING or is_ours(record)


class _BarSafeStream:
    """stderr for log handlers: a line written while a bar is live goes above the bar."""

    def write(self, text: str) -> int:
        stream = sys.stderr
        if _live_bars:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=stream):
                return stream.write(text)
        return stream.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def close(self) -> None:  # logging's shutdown closes handler streams: stderr stays open
        pass


class CompactFormatter(logging.Formatter):
    """`I 10:02:03 train.py:296] message`: absl's prefix without the date, microseconds and
    thread id (the default level; 'info' and 'debug' keep absl's full prefix)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{record.levelname[:1]} {stamp} {record.filename}:{record.lineno}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


_FILTER = QuietThirdParty()
_STREAM = _BarSafeStream()
_COMPACT = CompactFormatter()
_absl_formatter = []  # absl's own formatter, put back by the 'info' and 'debug' levels


def configure_logging(level: str = "warning") -> None:
    """Applies a level of LOG_LEVELS to this process (idempotent; call it before TensorFlow
    loads for its C++ notices): 'warning' hides third-party INFO, 'info' shows every INFO line,
    'debug' every line. fvdm_jax's INFO lines, warnings and errors show at every level.
    TensorFlow only writes TensorBoard events here: its oneDNN kernels (whose start notice
    TF_CPP_MIN_LOG_LEVEL does not hide) are turned off. Variables already set are kept."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LOG_LEVELS)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if level == "warning" else "0")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    handlers = list(root.handlers)
    try:
        from absl import logging as absl_logging

        absl_handler = absl_logging.get_absl_handler()
        if absl_handler not in handlers:
            handlers.append(absl_handler)
        python_handler = absl_handler.python_handler
        if python_handler.stream is sys.stderr:
            python_handler.stream = _STREAM  # log lines above a live bar, not through it
        if python_handler.formatter is not _COMPACT:
            _absl_formatter[:] = [python_handler.formatter]
        python_handler.setFormatter(_COMPACT if level == "warning" else _absl_formatter[0])
    except ImportError:
        pass
    for handler in handlers:
        if level == "warning":
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
        else:
            handler.removeFilter(_FILTER)


# ---------------------------------------------------------------------------------------------
# Progress.


def configure_progress(console_config: Mapping | None) -> None:
    """Takes console.progress and console.plain_every_sec of the config (None: the defaults)."""
    if not console_config:
        return
    mode = str(console_config.get("progress", "auto"))
    if mode not in PROGRESS_MODES:
        raise ValueError(f"console.progress={mode!r}: use one of {', '.join(PROGRESS_MODES)}")
    _settings["progress"] = mode
    _settings["plain_every_sec"] = float(console_config.get("plain_every_sec", 60.0))


def interactive() -> bool:
    """A person watches a terminal: stderr is a TTY, not a dumb one, and this is not CI."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM") != "dumb" and not os.environ.get("CI")


def _is_main_process() -> bool:
    if "jax" not in sys.modules:  # not started yet: a single process so far
        return True
    import jax

    return jax.process_index() == 0


def progress_mode() -> str:
    """'bar', 'plain' or 'off' for this process (only process 0 shows progress)."""
    if not _is_main_process():
        return "off"
    mode = _settings["progress"]
    if mode == "auto":
        return "bar" if interactive() else "plain"
    if mode == "bar":
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return "plain"
    return mode


def emit(text: str, *, stream=None) -> None:
    """Lines for the person at the console (process 0; stderr unless `stream`), above any live
    bar and without a log prefix."""
    if not _is_main_process():
        return
    stream = stream or sys.stderr
    if _live_bars and stream is sys.stderr:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=stream):
            stream.write(text + "\n")
    else:
        stream.write(text + "\n")
    stream.flush()


def duration(seconds: float | None) -> str:
    """'42s', '3:07', '1:02:03' ('?' for None or not finite)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    if seconds < 60:
        return f"{seconds}s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgress:
    """The bar's interface (update, set_postfix_str, close) as plain lines: one at least every
    `every_sec` seconds while it moves, and one at the end."""

    def __init__(self, total: int, desc: str, unit: str, every_sec: float, initial: int = 0):
        self.total, self.desc, self.unit, self.every_sec = int(total), desc, unit, float(every_sec)
        self.n = self._start = int(initial)
        self.postfix = ""
        self._started = self._last = time.perf_counter()
        self._closed = False

    def _line(self, final: bool = False) -> str:
        elapsed = time.perf_counter() - self._started
        rate = (self.n - self._start) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 and self.total else None
        percent = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f"done in {duration(elapsed)}" if final else f"{duration(elapsed)} elapsed, ETA {duration(left)}"
        extra = f" | {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.n}/{self.total}{percent}, {rate:.3g} {self.unit}/s{extra} | {tail}"

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.perf_counter()
        if self.every_sec > 0 and now - self._last >= self.every_sec and self.n < self.total:
            self._last = now
            emit(self._line())

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n > self._start:
                emit(self._line(final=True))


class _Bar:
    """A tqdm bar registered as live (log lines and `emit` go above it) until closed."""

    def __init__(self, **kwargs):
        from tqdm import tqdm

        self._bar = tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)
        _live_bars.add(self)

    def __getattr__(self, name):
        return getattr(self._bar, name)

    def close(self) -> None:
        _live_bars.discard(self)
        self._bar.close()


def bar(total: int, desc: str, *, unit: str = "video", leave: bool = False, initial: int = 0):
    """A progress display for `total` units on process 0: a tqdm bar, plain lines, or None
    (other processes, console.progress=off). Use `update(n)` and `close()`."""
    mode = progress_mode()
    if mode == "off":
        return None
    if mode == "plain":
        return PlainProgress(total, desc, unit, _settings["plain_every_sec"], initial=initial)
    return _Bar(total=total, desc=desc, unit=unit, leave=leave, initial=initial)


def _g(value: float) -> str:
    return f"{value:.4g}"


LINE_KEYS = ("loss", "mse", "vb", "grad_norm", "lr")  # the training line, in this order


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


class TrainProgress:
    """Training progress on process 0: the bar moves with every dispatched step; every log
    interval gives one line, `step N/T (P%) | loss .. | steps/s videos/s | elapsed, ETA` (also
    the whole output of plain mode, with a line every console.plain_every_sec between them).
    Rates are those the loop measured between its device syncs (dispatch runs ahead); the ETA
    uses the mean rate since the first log step (after compilation, checkpoints included)."""

    def __init__(self, num_steps: int, start: int):
        self.num_steps, self.start = int(num_steps), int(start)
        self.started = self._last_line = time.perf_counter()
        self.steps_per_sec = None  # for the ETA
        self.last = {}  # the last logged scalars
        self._anchor = None  # (time, step) of the first log step
        self._width = len(str(self.num_steps))
        self._display = None
        self.mode = progress_mode()
        if self.mode == "bar":
            self._display = _Bar(total=self.num_steps, initial=self.start, desc="train", unit="step",
                                 leave=False, bar_format="{desc} {percentage:3.0f}%|{bar}| "
                                 "{n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def eta(self, step: int) -> float | None:
        return (self.num_steps - step) / self.steps_per_sec if self.steps_per_sec else None

    def _head(self, step: int) -> str:
        return f"step {step:>{self._width}}/{self.num_steps} ({100.0 * step / self.num_steps:.0f}%)"

    def _tail(self, step: int) -> str:
        tail = f"{duration(time.perf_counter() - self.started)} elapsed"
        return tail + (f", ETA {duration(self.eta(step))}" if step < self.num_steps else "")

    def update(self, step: int) -> None:
        """After each dispatched step (no device sync)."""
        if self._display is not None:
            self._display.update(step - self._display.n)
        elif self.mode == "plain" and _settings["plain_every_sec"] > 0:
            now = time.perf_counter()
            if now - self._last_line >= _settings["plain_every_sec"]:
                self._last_line = now
                last = " ".join(f"{k} {_g(self.last[k])}" for k in LINE_KEYS if k in self.last)
                last = f"last logged {last} at step {self.last['step']}" if last else "no log step yet"
                emit(f"{self._head(step)} running | {last} | {self._tail(step)}")

    def line(self, step: int, scalars: Mapping[str, float]) -> str:
        """The one line of a log interval."""
        rates = [f"{_rate(scalars[k])} {unit}" for k, unit in
                 (("steps_per_sec", "steps/s"), ("videos_per_sec", "videos/s")) if k in scalars]
        if "mfu" in scalars:
            rates.append(f"MFU {100.0 * scalars['mfu']:.2g}%")
        if "first_step_sec" in scalars:
            rates.append(f"first step {scalars['first_step_sec']:.1f}s (compiling)")
        parts = [self._head(step), " ".join(f"{k} {_g(scalars[k])}" for k in LINE_KEYS if k in scalars),
                 " ".join(rates), self._tail(step)]
        return " | ".join(p for p in parts if p)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """At a log step, with the interval's mean scalars and measured rates."""
        if self.mode == "off":
            return
        now = self._last_line = time.perf_counter()
        if self._anchor is None:
            self._anchor = (now, step)
            self.steps_per_sec = scalars.get("steps_per_sec") or None
        elif step > self._anchor[1]:
            self.steps_per_sec = (step - self._anchor[1]) / max(now - self._anchor[0], 1e-9)
        self.last = {**scalars, "step": step}
        if self._display is not None:
            postfix = [f"loss {_g(scalars['loss'])}"] if "loss" in scalars else []
            postfix += [f"{_rate(scalars[k])} {unit}" for k, unit in
                        (("steps_per_sec", "steps/s"), ("videos_per_sec", "videos/s")) if k in scalars]
            postfix.append(f"ETA {duration(self.eta(step))}")
            self._display.set_postfix_str(", ".join(postfix), refresh=False)
            self._display.update(step - self._display.n)
        emit(self.line(step, scalars))

    def note(self, step: int, name: str, text: str) -> None:
        """A line for a periodic action's result (FVD, samples)."""
        if self.mode != "off":
            emit(f"{self._head(step)} | {name}: {text}")

    def close(self) -> None:
        if self._display is not None:
            self._display.close()
            self._display = None

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Banner and summary.


def table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """`title` and the rows as aligned `  name  value` lines (rows with an empty value dropped)."""
    rows = [(name, str(value)) for name, value in rows if value not in (None, "")]
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join([title] + [f"  {name:<{width}}  {value}" for name, value in rows])


def banner(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """The start of a run, on stderr (process 0)."""
    emit(table(title, rows))


def summary(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """The end of a run, on stdout with the run's other results (process 0)."""
    emit(table(title, rows), stream=sys.stdout)


def si(value: float | None, unit: str = "") -> str:
    """1.9e6 -> '1.9M', (1.2e13, ' FLOP') -> '12 TFLOP' ('?' for None or 0)."""
    if not value:
        return "?"
    for size, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit[:1] if unit.startswith(' ') else ''}{prefix}{unit.strip()}"
    return f"{value:.3g}{unit}"


def _describe_source(source) -> str:
    text = ""
    if hasattr(source, "describe"):
        lines = str(source.describe()).strip().splitlines()
        text = lines[0] if lines else ""
    text = text or type(source).__name__
    try:
        size = len(source)
    except TypeError:
        return text
    return text if str(size) in text else f"{text}; {size} examples"


def training_rows(config, *, model, num_params: int, flops_per_step: float | None, mesh, source,
                  workdir: str, start: int, resumed: bool) -> list[tuple[str, str]]:
    """The banner of a training run: model, parameters, FLOPs, mesh, data, steps, workdir."""
    import jax

    m, t = config.model, config.train
    batch = int(t.batch_size)
    if (m.get("architecture") or "dit") == "wan":
        patch = "x".join(str(p) for p in model.patch_size)
        model = (f"Wan {m.wan.size}: dim {model.dim}, ffn {model.ffn_dim}, {model.num_layers} layers, "
                 f"{model.num_heads} heads, patch {patch}, text {model.text_dim}; {m.num_frames} latent "
                 f"frames x {model.in_channels} channels, rectified flow (shift "
                 f"{float(config.diffusion.get('shift', 5.0)):g}); {si(num_params)} parameters ({num_params:,})")
    else:
        name = "custom" if str(m.size) == "custom" else f"{m.size}/{m.patch_size}"
        classes = f"{m.num_classes} classes" if int(m.num_classes or 0) else "unconditional"
        model = (f"{name}: hidden {model.hidden_size}, depth {model.depth}, {model.num_heads} heads, "
                 f"patch {m.patch_size}; input {m.num_frames}x{m.input_size}x{m.input_size}x{m.in_channels} "
                 f"(frames x H x W x C), {classes}; {si(num_params)} parameters ({num_params:,})")
    if flops_per_step is None:
        compute = f"FLOPs not counted for this model ({batch} videos per step; no MFU)"
    else:
        compute = f"{si(flops_per_step, ' FLOP')} per step ({batch} videos, analytic forward + backward)"
    axes = " x ".join(f"{name} {size}" for name, size in dict(mesh.shape).items())
    device = jax.devices()[0].device_kind
    processes = jax.process_count()
    placement = (f"{axes} = {mesh.size} device{'s' if mesh.size != 1 else ''} ({device})"
                 + (f", {processes} processes" if processes > 1 else ""))
    data = f"{config.data.source}: {_describe_source(source)}; global batch {batch}"
    if int(t.get("grad_accum_steps", 1)) > 1:
        data += f" in {t.grad_accum_steps} micro-batches"
    every = [f"log every {t.log_every_steps}", f"checkpoint every {config.checkpoint.every_steps}"]
    if int(config.sample.get("every_steps") or 0):
        every.append(f"samples every {config.sample.every_steps}")
    if int(config.eval.get("every_steps") or 0):
        every.append(f"FVD every {config.eval.every_steps}")
    if resumed:
        begin = f"resumed at step {start}"
    elif t.get("init_from"):
        begin = f"new, weights from {t.init_from}"
    else:
        begin = "new run"
    steps = f"{start} -> {t.num_steps} ({begin}); {', '.join(every)}"
    return [("model", model), ("compute", compute), ("mesh", placement), ("data", data),
            ("steps", steps), ("workdir", str(workdir))]
