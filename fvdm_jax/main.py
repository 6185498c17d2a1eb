"""python -m fvdm_jax.main: train, sample, evaluate, encode and export FVDM models.

    python -m fvdm_jax.main --config=CONFIG --workdir=DIR [--mode=MODE] [--config.section.key=value ...]

Modes (--mode; one workdir holds a run's checkpoints, metrics, plots, samples and exports):
  train   train config.train.num_steps steps; rerunning the same command resumes (the default)
  sample  videos of config.sample.task from the workdir's latest EMA weights -> DIR/samples/
  eval    FVD of config.eval.generated, or of videos sampled now, against real clips -> DIR/eval.jsonl
  encode  a video folder (config.data.path) -> the SD-VAE latent cache DIR/latents (Wan: captioned
          videos -> per-clip latents + text contexts DIR/text_latent_clips, docs/wan.md)
  export  the EMA weights of the latest checkpoint -> an inference checkpoint DIR/export/step_N
  compile the train step compiled for a TPU slice here, no TPU needed (config.compile.topology,
          e.g. v5e-16): per-chip memory vs HBM, collectives, fits -> DIR/compile.json

Configs: configs/default.py lists every key with its default and a comment (the schema);
configs/demo.py (the built-in demo, CPU), tiny.py (seconds on CPU) and ffs_xl.py, sky_xl.py,
ucf_xl.py, taichi_xl.py (the official recipes) override it. Any key can be set on the command line,
e.g. --config.model.size=B --config.train.batch_size=8; an unknown key or a bad value is one line.

Examples:
  python -m fvdm_jax.main --config=configs/demo.py --workdir=/tmp/fvdm_demo
  python -m fvdm_jax.main --config=configs/demo.py --workdir=/tmp/fvdm_demo --mode=sample \\
      --config.sample.task=interpolate --config.sample.num_videos=8
  tensorboard --logdir /tmp/fvdm_demo

Console: progress bars on a terminal, plain progress lines in logs (config.console.progress);
third-party INFO logs (orbax, absl, clu, JAX, TensorFlow) are hidden: --log_level=info (or
--verbosity=1) shows them, --log_level=debug everything; warnings and errors always show.
Multi-process runs (TPU pods, SLURM, MPI) start jax.distributed here, as fvdm_jax/runtime/distributed.py
detects them (FVDM_DISTRIBUTED=1/0 forces), or from --coordinator_address/--num_processes/--process_id.
Docs: README.md, docs/training.md, docs/sampling.md, docs/evaluation.md, docs/datasets.md.
"""

from __future__ import annotations

import errno
import os
import sys
import textwrap

from absl import app, flags, logging
from ml_collections import config_flags

LOG_LEVELS = ("warning", "info", "debug")  # fvdm_jax.runtime.console.LOG_LEVELS (not imported: no JAX yet)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file (configs/default.py has every key); override keys with "
    "--config.section.key=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The run directory: checkpoints/, metrics.jsonl, plots/, samples/, export/, "
    "TensorBoard events. Created (with missing parents) by the modes that write; a local path or "
    "a gs:// / s3:// URL.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "export", "encode", "sample", "eval", "compile"],
                          "What to run: one of the modes above.")
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", None, list(LOG_LEVELS), "Third-party logs shown: warning (default: warnings and "
    "errors), info (orbax, absl, clu, JAX and TensorFlow INFO lines too), debug (everything). "
    "fvdm_jax's own lines always show. Default from --verbosity: 0 warning, 1 info, 2 debug.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (a manual multi-process launch).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a manual launch.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a manual launch.")
flags.FLAGS["verbosity"].help = ("0 (default): fvdm_jax's INFO, everyone's warnings; 1: third-party "
                                 "INFO too (= --log_level=info); 2: debug.")


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() for multi-process launches only (never in data workers,
    which do not run this module's main); see fvdm_jax/runtime/distributed.py for the detection."""
    from fvdm_jax.runtime.distributed import initialize

    if _COORDINATOR.value is not None and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
        raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _train(config, workdir):
    from fvdm_jax.jobs.train import train_job

    result = train_job(config, workdir)
    if result.preempted:
        # Saved and stopped early (SIGTERM: 143, Ctrl-C: 130; on several processes every one stops
        # after the same step with the same code): rerun to resume. A signal that arrives now (a
        # scheduler signals every host, seconds apart) no longer changes the exit code.
        from fvdm_jax.training.preemption import ignore_signals

        ignore_signals()
        sys.exit(result.exit_code)


def _export(config, workdir):
    from fvdm_jax.jobs.export import export

    print(export(config, workdir))


def _encode(config, workdir):
    from fvdm_jax.models.build import architecture_of

    if architecture_of(config.model) == "wan":  # captioned videos -> text-latent clips
        from fvdm_jax.jobs.encode_wan import encode_wan_clips

        print(encode_wan_clips(config, workdir))
        return
    from fvdm_jax.jobs.encode import encode_dataset

    print(encode_dataset(config, workdir))


def _sample(config, workdir):
    from fvdm_jax.jobs.sample import sample_job

    print(sample_job(config, workdir))


def _eval(config, workdir):
    from fvdm_jax.jobs.evaluate import eval_job

    print(eval_job(config, workdir))


def _compile(config, workdir):
    from fvdm_jax.jobs.compile import compile_job

    records, text = compile_job(config, workdir)
    print(text)
    if any(record["fits"] is False for record in records):
        sys.exit(1)  # scripts see the verdict; the line above says what does not fit


MODES = {"train": _train, "export": _export, "encode": _encode, "sample": _sample, "eval": _eval,
         "compile": _compile}


def run_mode(mode: str, config, workdir: str):
    """MODES[mode]; on several processes, a collective that failed because another process died
    (or a second Ctrl-C) ends this process at once with one line, exit 75 (130), instead of a
    traceback followed by JAX's shutdown barrier, which waits for the dead process and then
    aborts with a C++ stack dump (fvdm_jax/training/preemption.py)."""
    import jax

    if jax.process_count() == 1:
        return MODES[mode](config, workdir)
    from fvdm_jax.training import preemption

    try:
        return MODES[mode](config, workdir)
    except KeyboardInterrupt:
        preemption.exit_now(preemption.EXIT_SIGINT, "second Ctrl-C: stopped at once without saving; "
                            + preemption.resume_note(workdir if mode == "train" else None))
    except Exception as error:
        cause = preemption.peer_failure(error)
        if cause is None:
            raise
        preemption.exit_peer_lost(cause, workdir if mode == "train" else None)


def _fail(message: str, code: int = 1):
    """What the user can fix: one line on stderr, then exit."""
    print(f"fvdm_jax: error: {message}", file=sys.stderr)
    sys.exit(code)


def log_level(level: str | None, verbosity: int) -> str:
    """--log_level when given, else from absl's --verbosity (0 warning, 1 info, 2+ debug)."""
    return level or LOG_LEVELS[min(max(int(verbosity), 0), len(LOG_LEVELS) - 1)]


def check_workdir(mode: str, config, workdir: str, config_arg: str) -> str | None:
    """The one-line problem with `workdir` for `mode`, or None. A mode that reads weights
    (export; sample and eval without sample.checkpoint / eval.generated) needs a training
    checkpoint there; a workdir that is a file is an error; the writing modes (compile included:
    it writes compile.json, reads no checkpoint) create a missing local workdir, parents included."""
    from fvdm_jax.runtime import files

    if not files.is_url(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
        return f"--workdir={workdir} is a file; give a directory (it is created if missing)"
    needs_checkpoint = mode == "export" or (
        mode in ("sample", "eval") and not config.sample.get("checkpoint")
        and not (mode == "eval" and config.eval.get("generated")))
    if needs_checkpoint:
        folder = files.join(files.resolve(workdir), "checkpoints")
        if not (files.isdir(folder) and any(name.isdigit() for name in files.listdir(folder))):
            train = f"python -m fvdm_jax.main --config={config_arg} --workdir={workdir}"
            fix = {"export": f"train first: {train}",
                   "sample": f"train first ({train}) or sample an inference checkpoint: "
                             f"--config.sample.checkpoint=DIR",
                   "eval": f"train first ({train}), evaluate saved videos with "
                           f"--config.eval.generated=PATH/samples.npz, or set --config.sample.checkpoint=DIR"}
            return f"--mode={mode} needs a training checkpoint and {folder} has none; {fix[mode]}"
    elif not files.is_url(workdir):
        os.makedirs(workdir, exist_ok=True)
    return None


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])}: flags take the form --name=value "
              f"(python -m fvdm_jax.main --help)", 2)
    for name, value in (("config", _CONFIG.value), ("workdir", _WORKDIR.value)):
        if value is None or value == "":
            _fail(f"--{name} is required, e.g. python -m fvdm_jax.main --config=configs/demo.py "
                  f"--workdir=/tmp/fvdm_demo (--help lists the modes)", 2)
    if _MODE.value == "compile":  # compile-only: the TPU is libtpu's description, never a local one
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Before JAX and TensorFlow load: their C++ notices read TF_CPP_MIN_LOG_LEVEL at start.
    from fvdm_jax.runtime import console

    console.configure_logging(log_level(_LOG_LEVEL.value, flags.FLAGS["verbosity"].value))
    from fvdm_jax.config.checks import check
    from fvdm_jax.errors import ConfigError

    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    try:  # the whole config once, before anything starts: one line for a bad key or value
        check(_CONFIG.value, _MODE.value, near=config_arg)
        console.configure_progress(_CONFIG.value.get("console"))
    except (ConfigError, ValueError) as e:
        _fail(str(e), 2)
    try:
        problem = check_workdir(_MODE.value, _CONFIG.value, _WORKDIR.value, config_arg)
    except OSError as e:
        problem = f"--workdir={_WORKDIR.value}: {e.strerror or e} (choose a writable directory)"
    if problem:
        _fail(problem)
    maybe_initialize_distributed()
    import jax

    from fvdm_jax.checkpoint.manager import CheckpointError
    from fvdm_jax.training.loop import NonFiniteError

    if jax.process_count() > 1:
        logging.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(),
                     jax.device_count(), jax.devices()[0].device_kind)
    try:
        run_mode(_MODE.value, _CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, FileExistsError, NonFiniteError, CheckpointError) as e:
        # What the user can fix, in one line; every other exception keeps its traceback.
        _fail(str(e))
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        _fail(f"{e.strerror}: {e.filename or ''} (free space or fix permissions, then rerun: "
              f"training resumes from the last checkpoint)")


# A full disk, a quota, a read-only or forbidden path: one line, not a traceback.
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _one_line(error: BaseException) -> str:
    text = str(error.args[0]) if error.args else str(error)
    text = text.replace("\\'", "'").replace("\\n", " ").replace("\n", " ").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    if isinstance(error, (AttributeError, KeyError)):
        text = f"unknown config key {text}"
    return text


HELP_FLAGS = ("--help", "-h", "-help", "--helpshort", "-?")


def usage() -> str:
    """The module docstring (modes, configs, examples), then the flags a run takes."""
    lines = [__doc__.rstrip(), "", "Flags:"]
    for name in ("config", "workdir", "mode", "log_level", "verbosity", "coordinator_address",
                 "num_processes", "process_id"):
        flag = flags.FLAGS[name]
        default = "" if flag.default in (None, "", -1) else f" (default: {flag.default})"
        lines.append(f"  --{name}{default}")
        lines.extend(textwrap.wrap(flag.help, width=96, initial_indent="      ",
                                   subsequent_indent="      "))
    lines += ["", "absl's and JAX's own flags: --helpfull."]
    return "\n".join(lines)


def parse_flags(argv):
    """absl flag parsing with config errors reduced to one line (unknown keys, bad values);
    --help prints `usage()` and exits 0."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(usage())
        sys.exit(0)
    config = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    if config is not None and not os.path.isfile(config.split(":", 1)[0]):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
        known = sorted(n for n in os.listdir(here) if n.endswith(".py")) if os.path.isdir(here) else []
        hint = f" (in {here}: {', '.join(known)})" if known else ""
        _fail(f"--config={config}: no such file; give a config file such as configs/demo.py{hint}", 2)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _fail(_one_line(e), 2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
