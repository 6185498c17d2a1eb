"""The recipe a checkpoint was trained with, and what a resumed run may change.

A checkpoint stores the whole config it was written with. Resuming it with another objective,
data stream or parameter shape would silently train something else (or fail deep inside orbax),
so a resume compares the recipe keys of both configs first and refuses on any difference, in
one line that lists each key with both values. `train.allow_recipe_change=True` lets a deliberate
change through (logged). Operational keys (how long, how often, how fast, where the data is
read from, the mesh) are not recipe and may change freely.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fvdm_jax.errors import ConfigError

RECIPE_SECTIONS = ("model", "diffusion", "ptss", "data", "train", "lora")
# Keys of the recipe sections that do not change what is trained: free to change on resume.
OPERATIONAL_KEYS = {
    "model": {"dtype", "attention", "remat", "scan_layers"},  # precision, kernels, layout: not the weights
    "data": {"num_workers", "device_prefetch", "path", "cache_path", "tfds_data_dir"},  # how / where it is read
    "train": {"num_steps", "log_every_steps", "peak_flops_per_device", "donate_state",
              "grad_accum_steps", "allow_recipe_change",  # accumulation keeps the maths
              # where the first state came from: a resume ignores them
              "init_from", "init_strict", "init_step_from_checkpoint"},
    "lora": {"init_from", "export", "strength"},  # first values; what an export / sample uses
}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _is_section(value) -> bool:
    """A Mapping or a (nested) ConfigDict, which is not a Mapping."""
    return not isinstance(value, (str, bytes)) and hasattr(value, "keys") and hasattr(value, "__getitem__")


def recipe(config: Mapping[str, Any]) -> dict[str, Any]:
    """{'section.key': value} of the recipe keys of a config (a ConfigDict or its saved dict);
    a sub-section's keys are 'section.sub.key' (model.wan.dim)."""
    flat = {}

    def add(prefix, values, skip):
        for key in values.keys():
            if key in skip:
                continue
            if _is_section(values[key]):
                add(f"{prefix}{key}.", values[key], ())
            else:
                flat[f"{prefix}{key}"] = _plain(values[key])

    for section in RECIPE_SECTIONS:
        add(f"{section}.", config.get(section) or {}, OPERATIONAL_KEYS.get(section, ()))
    return flat


def recipe_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: saved -> current' for each recipe key both configs have and that differs."""
    old, new = recipe(saved), recipe(current)
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(old.keys() & new.keys())
            if old[key] != new[key]]


def check_resume(saved: Mapping[str, Any], config, step: int, directory: str) -> None:
    """Raises ConfigError (one line) if `config` changes the recipe of the checkpoint at `step`."""
    changes = recipe_changes(saved, config)
    if not changes:
        return
    if bool(config.train.get("allow_recipe_change", False)):
        logging.warning("resuming step %d of %s with a changed recipe (train.allow_recipe_change): "
                        "%s", step, directory, "; ".join(changes))
        return
    raise ConfigError(
        f"the checkpoint at step {step} in {directory} was trained with another recipe: "
        f"{'; '.join(changes)}. Resume with the saved values, start a new workdir, or set "
        f"--config.train.allow_recipe_change=True to change them deliberately"
    )


WEIGHT_SECTIONS = ("model", "diffusion")


def weights_config(saved: Mapping[str, Any], config) -> tuple[dict, dict]:
    """(model, diffusion) config dicts the checkpoint's weights were trained with: the saved
    values over the current config's (keys the saved config lacks keep the current value). A
    command line that differs is logged, not used: the weights fit only the saved shapes and
    were trained for the saved process."""
    changed = [c for c in recipe_changes(saved, config) if c.split(".")[0] in WEIGHT_SECTIONS]
    if changed:
        logging.warning("using the checkpoint's model/diffusion config, not the command line's: %s",
                        "; ".join(changed))
    out = []
    for section in WEIGHT_SECTIONS:
        current = dict(config[section])
        stored = saved.get(section) or {}
        merged = {k: stored.get(k, v) for k, v in current.items()}
        out.append({k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})
    return out[0], out[1]
