"""The model a `model` config section describes: the Wan 2.1 DiT when model.architecture='wan',
else the Latte-style FVDM DiT (fvdm_jax/models/dit.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fvdm_jax.models import dit, wan

ARCHITECTURES = ("dit", "wan")


def model_from_config(model_config: Mapping[str, Any]):
    """Builds the network of the `model` config section (a ConfigDict or a plain dict)."""
    architecture = model_config.get("architecture") or "dit"
    if architecture == "wan":
        return wan.wan_from_config(model_config)
    if architecture != "dit":
        raise ValueError(f"model.architecture={architecture!r} is not one of {ARCHITECTURES}")
    return dit.model_from_config(model_config)
