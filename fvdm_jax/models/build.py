"""The model a `model` config section describes: the Wan 2.1 DiT when model.architecture='wan',
else the Latte-style FVDM DiT (fvdm_jax/models/dit.py), and the example inputs that initialize
either.

A Wan section comes in two forms: the training config's (configs/default.py: the Wan-only keys
in the `model.wan` sub-section, num_frames / in_channels / dtype / ... shared at the top) and the
flat dict of `wan.wan_model_config` and the converter (every key at the top). `flat_model_config`
turns the first into the second; both build the same model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from fvdm_jax.models import dit, wan

ARCHITECTURES = ("dit", "wan")
# Keys of the training config's `model` section that a Wan model reads besides model.wan.
WAN_SHARED_KEYS = ("in_channels", "num_frames", "dtype", "param_dtype", "remat", "attention",
                   "scan_layers")
WAN_SIZE_KEYS = ("dim", "ffn_dim", "num_heads", "num_layers")  # what model.wan.size fixes
WAN_SIZE_CHOICES = tuple(wan.WAN_SIZES) + ("custom",)


def architecture_of(model_config: Mapping[str, Any]) -> str:
    """'dit' or 'wan' (ValueError otherwise); a section without the key is a DiT's."""
    architecture = model_config.get("architecture") or "dit"
    if architecture not in ARCHITECTURES:
        raise ValueError(f"model.architecture={architecture!r} is not one of {ARCHITECTURES}")
    return architecture


def _is_section(value) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(value, "keys")


def flat_model_config(model_config: Mapping[str, Any]):
    """A Wan training `model` section -> the flat dict of `wan.wan_model_config` (model.wan's
    keys with model.wan.size resolved, plus the shared keys); a flat Wan dict or a DiT section
    is returned as it is."""
    if architecture_of(model_config) != "wan" or not _is_section(model_config.get("wan")):
        return model_config
    section = model_config["wan"]
    flat = {"architecture": "wan"}
    flat.update({k: model_config[k] for k in WAN_SHARED_KEYS if model_config.get(k) is not None})
    flat.update({k: section[k] for k in section.keys() if k != "size"})
    size = section.get("size", "custom")
    if size not in WAN_SIZE_CHOICES:
        raise ValueError(f"model.wan.size={size!r} is not one of {WAN_SIZE_CHOICES}")
    if size == "custom":
        missing = [f"model.wan.{k}" for k in WAN_SIZE_KEYS if section.get(k) is None]
        if missing:
            raise ValueError(f"model.wan.size='custom' needs {', '.join(missing)}")
        return flat
    for key, want in zip(WAN_SIZE_KEYS, wan.WAN_SIZES[size]):
        given = section.get(key)
        if given is not None and int(given) != want:
            raise ValueError(f"model.wan.{key}={given} contradicts model.wan.size={size!r} "
                             f"({key}={want}); set model.wan.size=custom to choose it freely")
        flat[key] = want
    return flat


def with_lora(model_config: Mapping[str, Any], lora_config: Mapping[str, Any] | None):
    """The flat Wan model config with the adapters of a `lora` config section (rank > 0); the
    model section as it is without adapters. Adapters on a DiT: ValueError."""
    rank = int((lora_config or {}).get("rank") or 0)
    if rank == 0:
        return model_config
    if architecture_of(model_config) != "wan":
        raise ValueError(f"lora.rank={rank}: LoRA is implemented for Wan (model.architecture="
                         f"'wan'); set lora.rank=0 for the DiT")
    flat = dict(flat_model_config(model_config))
    flat.update(lora_rank=rank, lora_alpha=lora_config.get("alpha"),
                lora_targets=tuple(lora_config.get("targets") or ()))
    return flat


def model_from_config(model_config: Mapping[str, Any]):
    """Builds the network of the `model` config section (a ConfigDict or a plain dict)."""
    if architecture_of(model_config) == "wan":
        return wan.wan_from_config(flat_model_config(model_config))
    return dit.model_from_config(model_config)


def init_inputs(model) -> tuple:
    """The example arguments `model.init(rng, *args)` takes: the smallest inputs of the right
    kind (the parameters do not depend on the frame count or the latent size)."""
    if isinstance(model, wan.Wan):
        _, ph, pw = model.patch_size
        return (jnp.zeros((1, 1, ph, pw, model.in_channels), jnp.float32),
                jnp.zeros((1, 1), jnp.float32), jnp.zeros((1, 1, model.text_dim), jnp.float32))
    f, s, c = model.num_frames, model.input_size, model.in_channels
    x = jnp.zeros((1, f, s, s, c), jnp.float32)
    t = jnp.zeros((1, f), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    return x, t, y
