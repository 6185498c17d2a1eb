"""fvdm_jax entry point.

    python -m fvdm_jax.main --config=configs/ffs_xl.py --workdir=DIR [--mode=train|export|encode|sample|eval]
                            [--config.section.key=value ...]

Multi-process runs (TPU pods, SLURM, MPI, several local processes) initialize jax.distributed
here, before any other JAX call: where fvdm_jax/distributed.py detects a cluster the way JAX does
(FVDM_DISTRIBUTED=1/0 forces either way), or from --coordinator_address/--num_processes/--process_id.
"""

from __future__ import annotations

import errno
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, exports).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "export", "encode", "sample", "eval"], "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a manual launch.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a manual launch.")


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() for multi-process launches only (never in data workers,
    which do not run this module's main); see fvdm_jax/distributed.py for the detection."""
    from fvdm_jax.distributed import initialize

    if _COORDINATOR.value is not None and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
        raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _train(config, workdir):
    from fvdm_jax.jobs.train import train_job

    result = train_job(config, workdir)
    if result.preempted:
        # Saved and stopped early (SIGTERM / preemption: 143, Ctrl-C: 130): rerun to resume.
        sys.exit(result.exit_code)


def _export(config, workdir):
    from fvdm_jax.jobs.export import export

    print(export(config, workdir))


def _encode(config, workdir):
    from fvdm_jax.jobs.encode import encode_dataset

    print(encode_dataset(config, workdir))


def _sample(config, workdir):
    from fvdm_jax.jobs.sample import sample_job

    print(sample_job(config, workdir))


def _eval(config, workdir):
    from fvdm_jax.jobs.evaluate import eval_job

    print(eval_job(config, workdir))


MODES = {"train": _train, "export": _export, "encode": _encode, "sample": _sample, "eval": _eval}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    from fvdm_jax.config_schema import validate
    from fvdm_jax.errors import ConfigError

    try:  # the whole config once, before anything starts: one line for a bad key or value
        validate(_CONFIG.value, near=config_flags.get_config_filename(flags.FLAGS["config"]))
    except ConfigError as e:
        print(f"fvdm_jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    maybe_initialize_distributed()
    import jax

    from fvdm_jax.checkpoint import CheckpointError
    from fvdm_jax.train import NonFiniteError

    logging.info(
        "process %d/%d, %d devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    try:
        MODES[_MODE.value](_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, FileExistsError, NonFiniteError, CheckpointError) as e:
        # What the user can fix, in one line; every other exception keeps its traceback.
        print(f"fvdm_jax: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        print(f"fvdm_jax: error: {e.strerror}: {e.filename or ''} (free space or fix permissions, "
              f"then rerun: training resumes from the last checkpoint)", file=sys.stderr)
        sys.exit(1)


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


def parse_flags(argv):
    """absl flag parsing with config errors reduced to one line (unknown keys, bad values)."""
    config = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    if config is not None and not os.path.isfile(config.split(":", 1)[0]):
        print(f"fvdm_jax: error: --config={config}: no such file (give a configs/*.py file)",
              file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"fvdm_jax: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
