"""The inference checkpoint, shared by every job:

    DIR/params        an orbax pytree of model parameters ({'params': ...}; EMA weights when trained)
    DIR/config.json   {'model': {...}, 'diffusion': {...}} (the config sections that define the model)

It is written by the official-checkpoint converter and by training's export, and read by sampling,
evaluation and fine-tuning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime import files

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def plain_config(config: Mapping[str, Any]) -> dict:
    """A ConfigDict or mapping -> JSON-ready nested dict."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(dict(config)))


def save_inference_checkpoint(
    directory: str, params, model_config: Mapping[str, Any], diffusion_config: Mapping[str, Any]
) -> str:
    """Writes params + config.json to `directory` (created; must not hold a checkpoint yet).

    params: numpy arrays, or jax Arrays as they lie on the mesh; with several processes every
    process calls this (each writes its own shards) and process 0 writes config.json."""
    import orbax.checkpoint as ocp

    directory = files.resolve(directory)
    params_dir = files.join(directory, PARAMS_DIR)
    exists = files.exists(params_dir)
    if jax.process_count() > 1:  # every process decides alike, before anyone writes
        from jax.experimental import multihost_utils

        exists = bool(multihost_utils.broadcast_one_to_all(np.asarray(exists)))
    if exists:
        raise FileExistsError(
            f"{params_dir} already exists; choose an empty output directory or remove it first"
        )
    if jax.process_index() == 0:
        files.makedirs(directory)
    params = jax.tree_util.tree_map(lambda a: a if isinstance(a, jax.Array) else np.asarray(a), params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        config = {"model": plain_config(model_config), "diffusion": plain_config(diffusion_config)}
        files.write_json(files.join(directory, CONFIG_FILE), config, indent=2)
    return directory


def load_inference_config(directory: str) -> dict:
    path = files.join(files.resolve(directory), CONFIG_FILE)
    if not files.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: an inference checkpoint directory holds params/ and config.json "
            f"(write one with `python -m fvdm_jax.convert` or training's --mode=export)"
        )
    with files.open_file(path) as f:
        config = json.load(f)
    for section in ("model", "diffusion"):
        if section not in config:
            raise ConfigError(f"{path} has no '{section}' section")
    return config


def load_inference_checkpoint(directory: str, target=None):
    """Returns (params, config). `target`: an abstract pytree (with shardings) to restore onto;
    None: numpy arrays on the host, whatever mesh or process count the export was written from."""
    import orbax.checkpoint as ocp

    config = load_inference_config(directory)
    params_dir = files.join(files.resolve(directory), PARAMS_DIR)
    if not files.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir} not found: the checkpoint has no parameters")
    checkpointer = ocp.StandardCheckpointer()
    if target is None:
        # Onto this process's first device, whatever mesh the export was written from.
        tree = checkpointer.metadata(params_dir)
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree,
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        # Host numpy arrays: every process holds them whole and places them on its mesh.
        return jax.device_get(checkpointer.restore(params_dir, target)), config
    return checkpointer.restore(params_dir, target), config
