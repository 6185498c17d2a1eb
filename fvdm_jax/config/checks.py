"""The config checked once, for the mode that runs it: the schema (every key, type, choice and
range against configs/default.py), then the checks that relate several keys, which the engine's
own constructors and validators make. main.py (and the experiment command) call `check` before
anything starts; the jobs and the engine receive a checked config and check nothing again.

This layer imports the engine (its registries and validators); the engine never imports it.
"""

from __future__ import annotations

from fvdm_jax.config.schema import validate
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.build import architecture_of, model_from_config, with_lora
from fvdm_jax.sampling.sampler import validate_sample_config
from fvdm_jax.training.setup import schedule_from_config
from fvdm_jax.training.step import validate_train_config

WAN_SOURCES = ("text_latents", "synthetic")  # the data sources that give text contexts
WAN_MODES = ("train", "export", "encode", "sample", "compile")
MODES = ("train", "export", "encode", "sample", "eval", "compile")


def check(config, mode: str = "train", *, near: str | None = None) -> None:
    """ConfigError (one line naming the key and the fix) for anything `mode` would trip over."""
    if mode not in MODES:
        raise ConfigError(f"--mode={mode!r} is not one of {', '.join(MODES)}")
    validate(config, near=near)
    try:
        model_from_config(with_lora(config.model, config.get("lora")))
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
    and runs WAN_MODES; periodic samples / FVD and the verdict are the DiT's."""
    wan = architecture_of(config.model) == "wan"
    process = config.diffusion.get("process") or "vp"
    if wan != (process == "flow"):
        fix = "diffusion.process=flow" if wan else "model.architecture=wan"
        raise ConfigError(f"model.architecture={config.model.get('architecture') or 'dit'!r} with "
                          f"diffusion.process={process!r}: the DiT trains with the VP process and "
                          f"Wan with rectified flow; set {fix}")
    if not wan:
        prompted = [k for k in ("prompts", "negative_prompt") if config.sample.get(k)]
        if mode in ("sample", "eval") and prompted:
            raise ConfigError(f"sample.{prompted[0]} is for text-conditioned Wan models; the DiT "
                              f"takes class labels (sample.labels): leave it unset")
        return
    if mode not in WAN_MODES:
        raise ConfigError(f"--mode={mode} is DiT-only for now; a Wan config runs --mode="
                          f"{', '.join(WAN_MODES)}")
    if mode == "encode":
        _check_wan_encode(config)
        return
    if mode == "sample":
        _check_wan_sample(config)
    if config.data.get("source") not in WAN_SOURCES:
        raise ConfigError(f"model.architecture='wan' trains on text contexts: set data.source to "
                          f"one of {', '.join(WAN_SOURCES)} (not {config.data.get('source')!r})")
    during = {"sample.every_steps": config.sample.get("every_steps"),
              "eval.every_steps": config.eval.get("every_steps"),
              "eval.after_training": tuple(config.eval.get("after_training") or ())}
    used = [f"{key}={value!r}" for key, value in during.items() if value]
    if used:
        raise ConfigError(f"{', '.join(used)}: periodic samples / FVD and the verdict are DiT-only; "
                          f"a Wan config sets them off (0, ())")


def _check_wan_encode(config) -> None:
    """--mode=encode of a Wan config reads data.path's captioned videos with both encoders."""
    missing = [f"{key} ({what})" for key, what in (
        ("data.path", "the folder of captioned videos"),
        ("encoders.vae", "a diffusers AutoencoderKLWan folder or Wan2.1_VAE.pth"),
        ("encoders.text", "a UMT5 encoder folder or models_t5_umt5-xxl-enc-bf16.pth"))
        if not config[key.split(".")[0]].get(key.split(".")[1])]
    if missing:
        raise ConfigError(f"--mode=encode of a Wan config needs {', '.join(missing)}")


def _check_wan_sample(config) -> None:
    """Prompts and a negative prompt need the text encoder, image / video inputs the VAE."""
    s, encoders = config.sample, config.get("encoders") or {}
    if not encoders.get("text"):
        for key in ("prompts", "negative_prompt"):
            if s.get(key):
                raise ConfigError(f"sample.{key}={s.get(key)!r} needs the UMT5 text encoder: set "
                                  f"encoders.text (a UMT5 encoder folder or "
                                  f"models_t5_umt5-xxl-enc-bf16.pth), or leave sample.{key} unset "
                                  f"to sample the data's text contexts")
    if s.get("inputs") and not encoders.get("vae"):
        raise ConfigError(f"sample.inputs={s.get('inputs')!r} (image / video files) needs the Wan "
                          f"VAE to encode them: set encoders.vae (a diffusers AutoencoderKLWan "
                          f"folder or Wan2.1_VAE.pth), or leave sample.inputs unset to take "
                          f"frames from the data")
