"""The config checked once, for the mode that runs it: the schema (every key, type, choice and
range against configs/default.py), then the checks that relate several keys, which the engine's
own constructors and validators make. main.py (and the experiment command) call `check` before
anything starts; the jobs and the engine receive a checked config and check nothing again.

This layer imports the engine (its registries and validators); the engine never imports it.
"""

from __future__ import annotations

from fvdm_jax.config.schema import validate
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.build import architecture_of, model_from_config
from fvdm_jax.sampling.sampler import validate_sample_config
from fvdm_jax.training.setup import schedule_from_config
from fvdm_jax.training.step import validate_train_config

WAN_SOURCES = ("text_latents", "synthetic")  # the data sources that give text contexts
WAN_MODES = ("train", "export", "sample", "compile")
MODES = ("train", "export", "encode", "sample", "eval", "compile")


def check(config, mode: str = "train", *, near: str | None = None) -> None:
    """ConfigError (one line naming the key and the fix) for anything `mode` would trip over."""
    if mode not in MODES:
        raise ConfigError(f"--mode={mode!r} is not one of {', '.join(MODES)}")
    validate(config, near=near)
    try:
        model_from_config(config.model)
        schedule_from_config(config.diffusion)
        _check_wan(config, mode)
        if mode in ("train", "compile"):
            validate_train_config(config.train, config.ptss)
        if mode in ("train", "sample", "eval") and architecture_of(config.model) != "wan":
            validate_sample_config(config.sample, config.model)
    except ConfigError:
        raise
    except ValueError as error:  # the engine's own argument checks
        raise ConfigError(str(error)) from None


def _check_wan(config, mode: str) -> None:
    """A Wan model trains with rectified flow on text contexts (text latents or synthetic ones)
    and runs WAN_MODES; periodic samples / FVD, the verdict and fine-tuning (init_from) are the
    DiT's."""
    wan = architecture_of(config.model) == "wan"
    process = config.diffusion.get("process") or "vp"
    if wan != (process == "flow"):
        fix = "diffusion.process=flow" if wan else "model.architecture=wan"
        raise ConfigError(f"model.architecture={config.model.get('architecture') or 'dit'!r} with "
                          f"diffusion.process={process!r}: the DiT trains with the VP process and "
                          f"Wan with rectified flow; set {fix}")
    if not wan:
        return
    if mode not in WAN_MODES:
        raise ConfigError(f"--mode={mode} is DiT-only for now; a Wan config runs --mode="
                          f"{', '.join(WAN_MODES)}")
    if config.data.get("source") not in WAN_SOURCES:
        raise ConfigError(f"model.architecture='wan' trains on text contexts: set data.source to "
                          f"one of {', '.join(WAN_SOURCES)} (not {config.data.get('source')!r})")
    during = {"sample.every_steps": config.sample.get("every_steps"),
              "eval.every_steps": config.eval.get("every_steps"),
              "eval.after_training": tuple(config.eval.get("after_training") or ()),
              "train.init_from": config.train.get("init_from")}
    used = [f"{key}={value!r}" for key, value in during.items() if value]
    if used:
        raise ConfigError(f"{', '.join(used)}: periodic samples / FVD, the verdict and init_from are "
                          f"DiT-only; a Wan config sets them off (0, (), None)")
