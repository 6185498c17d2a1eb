"""Checkpoint formats. The inference checkpoint is shared by every job:

    DIR/params        an orbax pytree of model parameters ({'params': ...}; EMA weights when trained)
    DIR/config.json   {'model': {...}, 'diffusion': {...}} (the config sections that define the model)

It is written by the official-checkpoint converter and by training's export, and read by sampling
and evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fvdm_jax.errors import ConfigError
from fvdm_jax.files import write_json

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def _plain(config: Mapping[str, Any]) -> dict:
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

    directory = os.path.abspath(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    exists = os.path.exists(params_dir)
    if jax.process_count() > 1:  # every process decides alike, before anyone writes
        from jax.experimental import multihost_utils

        exists = bool(multihost_utils.broadcast_one_to_all(np.asarray(exists)))
    if exists:
        raise FileExistsError(
            f"{params_dir} already exists; choose an empty output directory or remove it first"
        )
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
    params = jax.tree_util.tree_map(lambda a: a if isinstance(a, jax.Array) else np.asarray(a), params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        config = {"model": _plain(model_config), "diffusion": _plain(diffusion_config)}
        write_json(os.path.join(directory, CONFIG_FILE), config, indent=2)
    return directory


def load_inference_config(directory: str) -> dict:
    path = os.path.join(os.path.abspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: an inference checkpoint directory holds params/ and config.json "
            f"(write one with `python -m fvdm_jax.convert` or training's --mode=export)"
        )
    with open(path) as f:
        config = json.load(f)
    for section in ("model", "diffusion"):
        if section not in config:
            raise ConfigError(f"{path} has no '{section}' section")
    return config


def load_inference_checkpoint(directory: str, target=None):
    """Returns (params, config). `target`: an abstract pytree (with shardings) to restore onto."""
    import orbax.checkpoint as ocp

    config = load_inference_config(directory)
    params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir} not found: the checkpoint has no parameters")
    checkpointer = ocp.StandardCheckpointer()
    params = checkpointer.restore(params_dir, target) if target is not None else (
        checkpointer.restore(params_dir)
    )
    return params, config


# ----------------------------------------------------------------------------------------------
# Training checkpoints: state (params, EMA, optimizer) + data-iterator state + config JSON.



def _state_snapshot(data_iter):
    """The iterator's state now, as a grain iterator (the training loop may read ahead, and an
    async save must not see later states)."""
    import grain

    class _Snapshot(grain.DatasetIterator):
        def __init__(self, state):
            super().__init__()
            self._state = state

        def __next__(self):
            raise StopIteration

        def get_state(self):
            return self._state

        def set_state(self, state):
            self._state = state

    return _Snapshot(data_iter.get_state())


TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix for a save still being written


class TrainCheckpointer:
    """An orbax CheckpointManager over WORKDIR/checkpoints; the same path on every host."""

    def __init__(self, workdir: str, checkpoint_config: Mapping[str, Any], read_only: bool = False):
        """read_only (sampling, evaluation, export): never creates WORKDIR/checkpoints; a missing
        folder is a FileNotFoundError that says to train first."""
        import orbax.checkpoint as ocp

        if int(checkpoint_config["every_steps"]) < 1 or int(checkpoint_config["keep"]) < 1:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep must be at least 1")
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every_steps = int(checkpoint_config["every_steps"])
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(
                f"no checkpoint under {self.directory}: train first (--mode=train), or set "
                f"--config.sample.checkpoint=DIR (an exported or converted inference checkpoint)"
            )
        if not read_only:
            self._remove_unfinished_saves()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=self.every_steps,
            max_to_keep=int(checkpoint_config["keep"]),
            enable_async_checkpointing=bool(checkpoint_config["async_save"]),
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data_iter", "config")
        )

    def _remove_unfinished_saves(self) -> None:
        """Deletes the tmp folders of saves that a crash cut short (orbax never reads them; an XL
        one holds ~11 GB). Only at start, before this run saves anything, and on process 0."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if TMP_MARKER in name:
                logging.warning("removing the unfinished save %s", os.path.join(self.directory, name))
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, config: Mapping[str, Any], force=False) -> bool:
        import grain
        import orbax.checkpoint as ocp
        from flax import serialization

        items = dict(
            state=ocp.args.StandardSave(serialization.to_state_dict(state)),
            config=ocp.args.JsonSave(_plain(config)),
        )
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(_state_snapshot(data_iter))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def saved_config(self, step: int) -> dict:
        import orbax.checkpoint as ocp

        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def restore_state(self, step: int, abstract_state):
        """Restores the state onto `abstract_state` (ShapeDtypeStructs carrying shardings), so a
        checkpoint written on one mesh restores exactly onto another."""
        import orbax.checkpoint as ocp
        from flax import serialization

        target = serialization.to_state_dict(abstract_state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return serialization.from_state_dict(abstract_state, restored["state"])

    def restore_ema(self, step: int, abstract_ema):
        """Only the EMA weights of the checkpoint at `step`, onto abstract_ema ({'params': ...}
        of ShapeDtypeStructs with shardings): a partial restore that reads no optimizer state
        and no raw weights (about a quarter of the state's bytes)."""
        import orbax.checkpoint as ocp

        target = {"ema_params": abstract_ema}
        path = os.path.join(self.directory, str(step), "state")
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        return restored["ema_params"]

    def restore_data_iter(self, step: int, data_iter):
        """Restores the grain iterator's position in place."""
        import grain
        import orbax.checkpoint as ocp

        self.manager.restore(
            step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(data_iter))
        )
        return data_iter

    def wait_until_finished(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
