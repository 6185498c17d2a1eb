"""The config checked once, for the mode that runs it: the schema (every key, type, choice and
range against configs/default.py), then the checks that relate several keys, which the engine's
own constructors and validators make. main.py (and the experiment command) call `check` before
anything starts; the jobs and the engine receive a checked config and check nothing again.

This layer imports the engine (its registries and validators); the engine never imports it.
"""

from __future__ import annotations

from fvdm_jax.config.schema import validate
from fvdm_jax.diffusion import tasks
from fvdm_jax.diffusion.schedule import Schedule
from fvdm_jax.errors import ConfigError
from fvdm_jax.evaluation.features import BASELINES, VERDICT_TASKS
from fvdm_jax.evaluation.videos import SELECTIONS
from fvdm_jax.models.dit import model_from_config
from fvdm_jax.models.i3d import I3D_MIN_FRAMES
from fvdm_jax.sampling.sampler import validate_sample_config
from fvdm_jax.training.step import validate_train_config

MODES = ("train", "export", "encode", "sample", "eval")


def check(config, mode: str = "train", *, near: str | None = None) -> None:
    """ConfigError (one line naming the key and the fix) for anything `mode` would trip over."""
    if mode not in MODES:
        raise ConfigError(f"--mode={mode!r} is not one of {', '.join(MODES)}")
    validate(config, near=near)
    try:
        model_from_config(config.model)
        Schedule.from_config(config.diffusion)
        if mode == "train":
            validate_train_config(config.train, config.ptss)
            validate_verdict_config(config.eval)
        if mode in ("train", "eval"):
            validate_eval_config(config.eval)
        if mode in ("train", "sample", "eval"):
            validate_sample_config(config.sample, config.model)
    except ConfigError:
        raise
    except ValueError as error:  # the engine's own argument checks
        raise ConfigError(str(error)) from None


def validate_eval_config(eval_config) -> None:
    """One-line errors for bad eval.* values."""
    if eval_config.task not in tasks.EVAL_TASKS:
        raise ConfigError(f"eval.task={eval_config.task!r} is not supported; use one of {', '.join(tasks.EVAL_TASKS)}")
    if eval_config.real_selection not in SELECTIONS:
        raise ConfigError(f"eval.real_selection={eval_config.real_selection!r}; use one of {', '.join(SELECTIONS)}")
    for key in ("num_videos", "subsample_factor", "batch_size", "train_num_videos"):
        if int(eval_config[key]) < 1:
            raise ConfigError(f"eval.{key}={eval_config[key]} must be at least 1")
    if eval_config.num_frames is not None and eval_config.num_frames < I3D_MIN_FRAMES:
        raise ConfigError(f"eval.num_frames={eval_config.num_frames}: I3D needs at least {I3D_MIN_FRAMES} frames")




def validate_verdict_config(eval_config) -> None:
    """One-line errors for eval.after_training / eval.baselines."""
    chosen = tuple(eval_config.get("after_training") or ())
    unknown = [t for t in chosen if t not in VERDICT_TASKS]
    if unknown:
        raise ConfigError(f"eval.after_training has unknown task(s) {unknown}; use some of "
                         f"{', '.join(VERDICT_TASKS)}")
    unknown = [b for b in tuple(eval_config.get("baselines") or ()) if b not in BASELINES]
    if unknown:
        raise ConfigError(f"eval.baselines has unknown baseline(s) {unknown}; use some of "
                         f"{', '.join(BASELINES)}")
