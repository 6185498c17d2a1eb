"""The console of a run (fvdm_jax/runtime/console.py): quiet third-party logs, progress bars or plain
lines, the banner and the summary; the plots of fvdm_jax/runtime/metrics.py; and a real training run
from the command line, whose whole console is counted."""

import json
import logging
import os
import re
import sys

import numpy as np
import pytest
from absl import logging as absl_logging
from PIL import Image
from test_main import TINY, finish, run_main

from fvdm_jax.jobs.train import summary_rows
from fvdm_jax.runtime import console, metrics


@pytest.fixture
def restore_console():
    """Puts back what configure_logging / configure_progress change in this process."""
    root = logging.getLogger()
    level, settings = root.level, dict(console._settings)
    handler = absl_logging.get_absl_handler()
    stream, formatter = handler.python_handler.stream, handler.python_handler.formatter
    environ = {k: os.environ.get(k) for k in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    yield
    root.setLevel(level)
    console._settings.update(settings)
    handler.python_handler.stream = stream
    handler.python_handler.setFormatter(formatter)
    for h in [*root.handlers, handler]:
        h.removeFilter(console._FILTER)
    for key, value in environ.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _record(level, pathname, msg="a line", name="absl"):
    return logging.LogRecord(name, level, pathname, 1, msg, None, None)


def test_third_party_info_is_dropped_ours_and_warnings_pass():
    quiet = console.QuietThirdParty()
    orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    ours = os.path.join(console.PACKAGE_DIR, "train.py")
    assert not quiet.filter(_record(logging.INFO, orbax))  # orbax logs through absl's logger
    assert quiet.filter(_record(logging.WARNING, orbax))
    assert quiet.filter(_record(logging.ERROR, orbax))
    assert quiet.filter(_record(logging.INFO, ours))
    assert quiet.filter(_record(logging.INFO, "/elsewhere/x.py", name="fvdm_jax.evaluation.verdict"))
    probe = "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so"
    assert not quiet.filter(_record(logging.INFO, "/venv/jax/_src/xla_bridge.py", probe, "jax._src.xla_bridge"))
    assert not quiet.filter(_record(logging.WARNING, orbax, "Given directory is read only=%s"))


def test_configure_logging_sets_levels_filters_and_tensorflow_env(restore_console, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    handler = absl_logging.get_absl_handler()
    console.configure_logging("warning")
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1" and os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert console._FILTER in handler.filters and logging.getLogger().level == logging.INFO
    line = handler.python_handler.format(_record(logging.WARNING, "/x/train.py", "stopped at step 7"))
    assert re.fullmatch(r"W \d\d:\d\d:\d\d train\.py:1\] stopped at step 7", line), line
    console.configure_logging("warning")  # idempotent
    assert handler.filters.count(console._FILTER) == 1
    console.configure_logging("debug")
    assert console._FILTER not in handler.filters and logging.getLogger().level == logging.DEBUG
    assert handler.python_handler.formatter is not console._COMPACT  # absl's full prefix
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")  # the user's own choice is kept
    console.configure_logging("warning")
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    with pytest.raises(ValueError, match="use one of warning, info, debug"):
        console.configure_logging("loud")


def test_durations_and_si():
    assert [console.duration(s) for s in (0.4, 42, 187, 3723, None, float("nan"))] == \
        ["0s", "42s", "3:07", "1:02:03", "?", "?"]
    assert console.si(50816) == "50.8k" and console.si(1.9e6) == "1.9M"
    assert console.si(1.2e13, " FLOP") == "12 TFLOP" and console.si(None) == "?"


def test_plain_progress_prints_lines_not_redraws(restore_console, capsys):
    console.configure_progress({"progress": "plain", "plain_every_sec": 1e-9})
    bar = console.bar(4, "sampling generate", unit="batch")
    assert isinstance(bar, console.PlainProgress)
    for _ in range(4):
        bar.update(1)
    bar.close()
    bar.close()  # once only
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 4, lines  # 3 while it runs, 1 at the end
    assert lines[0].startswith("sampling generate: 1/4 (25%)") and "ETA" in lines[0]
    assert lines[-1].startswith("sampling generate: 4/4 (100%)") and "done in" in lines[-1]
    console.configure_progress({"progress": "off", "plain_every_sec": 60.0})
    assert console.bar(4, "x") is None
    with pytest.raises(ValueError, match="console.progress='loud'"):
        console.configure_progress({"progress": "loud"})


def test_auto_is_plain_without_a_terminal(restore_console, monkeypatch):
    console.configure_progress({"progress": "auto", "plain_every_sec": 60.0})
    assert console.progress_mode() == "plain"  # pytest's stderr is no TTY
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("CI", raising=False)
    assert console.progress_mode() == "bar"
    monkeypatch.setenv("CI", "true")
    assert console.progress_mode() == "plain"


def test_train_progress_lines_in_plain_and_bar_mode(restore_console, capsys):
    scalars = {"loss": 0.25, "mse": 0.2, "vb": 0.05, "grad_norm": 1.5, "lr": 1e-3,
               "steps_per_sec": 10.0, "videos_per_sec": 80.0, "first_step_sec": 3.2}
    for mode in ("plain", "bar"):
        console.configure_progress({"progress": mode, "plain_every_sec": 60.0})
        with console.TrainProgress(100, 0) as progress:
            for step in range(1, 51):
                progress.update(step)
            progress.log(50, scalars)
            progress.note(50, "fvd", "fvd64_16f 321.5")
        err = capsys.readouterr().err
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err).replace("\r", "\n")
        line = next(li for li in text.splitlines() if li.startswith("step  50/100"))
        assert "(50%)" in line and "loss 0.25 mse 0.2 vb 0.05" in line, line
        assert "10 steps/s 80 videos/s first step 3.2s (compiling)" in line and "ETA 5s" in line, line
        assert "step  50/100 (50%) | fvd: fvd64_16f 321.5" in text
        if mode == "plain":
            assert "\r" not in err and len(err.splitlines()) == 2
        else:
            assert "train  50%|" in text and "loss 0.25" in text  # the bar with its postfix


def test_plain_mode_says_it_is_alive_between_log_lines(restore_console, capsys):
    console.configure_progress({"progress": "plain", "plain_every_sec": 1e-9})
    with console.TrainProgress(10, 0) as progress:
        progress.update(1)  # e.g. after a long first compilation
        progress.log(5, {"loss": 0.5, "steps_per_sec": 2.0})
        progress.update(6)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("step  1/10 (10%) running | no log step yet | ") and "ETA ?" in lines[0]
    assert lines[1].startswith("step  5/10 (50%) | loss 0.5 | 2 steps/s")
    assert lines[2].startswith("step  6/10 (60%) running | last logged loss 0.5 at step 5 | "), lines
    assert lines[2].endswith("ETA 2s") and len(lines) == 3


def _write_rows(workdir, rows):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, metrics.METRICS_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _assert_real_png(path, min_bytes=5000):
    assert os.path.getsize(path) > min_bytes, path
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (400, 640, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # axes, lines, text: not one color


def test_loss_and_fvd_plots(tmp_path):
    workdir = str(tmp_path / "run")
    rows = [{"step": s, "loss": 1.0 / s, "mse": 0.9 / s, "vb": 0.1 / s} for s in range(10, 110, 10)]
    rows += [{"step": 50, "fvd64_16f": 900.0}, {"step": 100, "fvd64_16f": 500.0}]
    _write_rows(workdir, rows)
    assert sorted(metrics.write_plots(workdir)) == [os.path.join(workdir, metrics.FVD_PLOT),
                                                    os.path.join(workdir, metrics.LOSS_PLOT)]
    _assert_real_png(os.path.join(workdir, "plots", "loss.png"))
    _assert_real_png(os.path.join(workdir, "plots", "fvd.png"))
    assert metrics.fvd_series(metrics.read_rows(workdir)) == {"fvd64_16f": ([50, 100], [900.0, 500.0])}
    # The value just computed, before the loop writes its row, is on the curve too.
    other = str(tmp_path / "other")
    _write_rows(other, rows[:10])
    assert metrics.plot_fvd(other) is None  # no FVD ran during training
    assert metrics.plot_fvd(other, current={100: {"fvd64_16f": 400.0}}) == os.path.join(other, metrics.FVD_PLOT)
    assert metrics.write_plots(str(tmp_path / "empty")) == []


def test_summary_names_what_the_workdir_holds(tmp_path):
    workdir = str(tmp_path)
    _write_rows(workdir, [{"step": 2, "loss": 0.5, "mse": 0.4, "vb": 0.1}, {"step": 4, "loss": 0.25, "mse": 0.2}])
    for step in ("2", "4"):
        os.makedirs(os.path.join(workdir, "checkpoints", step))
    metrics.write_plots(workdir)
    rows = dict(summary_rows(workdir, steps=4, seconds=75.0, compilations=1))
    assert rows["final loss"] == "0.25 (mse 0.2) at step 4"
    assert rows["run"] == "at step 4 after 1:15 (this run); the train step compiled 1 time(s)"
    assert rows["checkpoints"].endswith("checkpoints (steps 2, 4)")
    assert rows["exports"].startswith("none yet: --mode=export")
    assert rows["loss curve"] == os.path.join(workdir, "plots", "loss.png")
    assert rows["tensorboard"].startswith("no events")
    open(os.path.join(workdir, "events.out.tfevents.1.host"), "w").close()
    os.makedirs(os.path.join(workdir, "export", "step_4"))
    rows = dict(summary_rows(workdir, steps=4, seconds=None, compilations=1))
    assert rows["tensorboard"] == f"tensorboard --logdir {workdir}" and "step_4" in rows["exports"]
    text = console.table("title", [("a", "1"), ("longer", "2"), ("empty", "")])
    assert text.splitlines() == ["title", "  a       1", "  longer  2"]


def test_plots_are_written_at_each_checkpoint(tmp_path):
    from fvdm_jax.config.load import load_config
    from fvdm_jax.training.loop import train

    config = load_config(TINY)
    config.train.num_steps, config.train.log_every_steps = 4, 1
    config.checkpoint.every_steps, config.checkpoint.async_save = 2, False
    config.mesh.shape = (1, 1, 1)
    workdir = str(tmp_path)
    plot = os.path.join(workdir, metrics.LOSS_PLOT)
    seen = {}
    train(config, workdir, devices=None, step_hook=lambda step: seen.setdefault(step, os.path.isfile(plot)))
    assert seen == {1: False, 2: False, 3: True, 4: True}  # written by the checkpoint of step 2
    _assert_real_png(plot, min_bytes=3000)


# ---------------------------------------------------------------------------------------------
# The command line: the whole console of a tiny run, and --verbosity=1.

NOISE = ("checkpoint_manager.py", "atomicity.py", "orbax", "Setting work unit notes",
         "logging_writer.py", "oneDNN", "absl::InitializeLog", "Unable to initialize backend")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step tiny run from the command line, its workdir under a parent that does not exist."""
    workdir = str(tmp_path_factory.mktemp("console") / "missing" / "parent" / "run")
    code, out, err = finish(run_main(
        f"--config={TINY}", f"--workdir={workdir}", "--config.train.num_steps=4",
        "--config.train.log_every_steps=2", "--config.checkpoint.every_steps=2", devices=1))
    assert code == 0, err[-3000:]
    return workdir, out, err


def test_a_tiny_run_has_a_short_console(trained):
    workdir, out, err = trained
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) <= 30, "\n".join(lines)
    assert not [line for line in lines if any(noise in line for noise in NOISE)], "\n".join(lines)
    text = "\n".join(lines)
    assert "fvdm_jax train" in text and "50.8k parameters (50,816)" in text
    assert "FLOP per step" in text and "mesh" in text and "synthetic" in text and workdir in text
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split("|")[0].strip() for line in progress] == ["step 2/4 (50%)", "step 4/4 (100%)"]
    assert all("loss " in line and "steps/s" in line and "videos/s" in line for line in progress)
    assert len(progress) == 2  # one line per log interval: clu does not repeat it
    assert "fvdm_jax train: done" in out and f"tensorboard --logdir {workdir}" in out
    assert f"{workdir}/checkpoints (steps 2, 4)" in out and f"{workdir}/plots/loss.png" in out
    _assert_real_png(os.path.join(workdir, "plots", "loss.png"), min_bytes=3000)
    assert [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))] == [2, 4]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


def test_verbosity_1_brings_third_party_info_back(trained):
    workdir, _, _ = trained
    code, out, quiet = finish(run_main(f"--config={TINY}", f"--workdir={workdir}", "--mode=export",
                                       "--config.checkpoint.export_dir=" + workdir + "/e1", devices=1))
    assert code == 0, quiet[-3000:]
    assert "orbax" not in quiet and "checkpoint_manager.py" not in quiet, quiet[-3000:]
    code, out, loud = finish(run_main(f"--config={TINY}", f"--workdir={workdir}", "--mode=export",
                                      "--verbosity=1", "--config.checkpoint.export_dir=" + workdir + "/e2",
                                      devices=1))
    assert code == 0, loud[-3000:]
    assert re.search(r"^I\d{4} .*(checkpoint_manager|checkpointer|orbax)", loud, re.M), loud[-3000:]
    assert out.strip().splitlines()[-1] == workdir + "/e2"  # stdout keeps the result
