"""The config checked once, for the mode that runs it: the schema (every key, type, choice and
range against configs/default.py), then the checks that relate several keys, which the engine's
own constructors and validators make. main.py (and the experiment command) call `check` before
anything starts; the jobs and the engine receive a checked config and check nothing again.

This layer imports the engine (its registries and validators); the engine never imports it.
"""

from __future__ import annotations

from fvdm_jax.config.schema import validate
from fvdm_jax.diffusion.schedule import Schedule
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.dit import model_from_config
from fvdm_jax.sampling.sampler import validate_sample_config
from fvdm_jax.training.step import validate_train_config

MODES = ("train", "export", "encode", "sample", "eval", "compile")


def check(config, mode: str = "train", *, near: str | None = None) -> None:
    """ConfigError (one line naming the key and the fix) for anything `mode` would trip over."""
    if mode not in MODES:
        raise ConfigError(f"--mode={mode!r} is not one of {', '.join(MODES)}")
    validate(config, near=near)
    try:
        model_from_config(config.model)
        Schedule.from_config(config.diffusion)
        if mode in ("train", "compile"):
            validate_train_config(config.train, config.ptss)
        if mode in ("train", "sample", "eval"):
            validate_sample_config(config.sample, config.model)
    except ConfigError:
        raise
    except ValueError as error:  # the engine's own argument checks
        raise ConfigError(str(error)) from None
