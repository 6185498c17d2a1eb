"""--mode=export: the EMA weights of WORKDIR's latest checkpoint as an inference checkpoint.

Only the EMA subtree is read (no optimizer state), restored onto its shardings; every process
writes its shards and process 0 the config.json, with the model and diffusion sections the
checkpoint was trained with (not the command line's).
"""

from __future__ import annotations

import logging
import os

import ml_collections

from fvdm_jax.checkpoint.inference import save_inference_checkpoint
from fvdm_jax.checkpoint.manager import TrainCheckpointer
from fvdm_jax.checkpoint.recipe import weights_config
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.training.state import abstract_ema_params


def with_saved_weights_config(config, saved: dict):
    """config with the model and diffusion sections the checkpoint was trained with."""
    model, diffusion = weights_config(saved, config)
    merged = ml_collections.ConfigDict(config.to_dict())
    merged.model = ml_collections.ConfigDict(model)
    merged.diffusion = ml_collections.ConfigDict(diffusion)
    return merged


def export(config, workdir: str, output: str | None = None, devices=None) -> str:
    """Writes the EMA parameters of the latest checkpoint to `output` (default
    checkpoint.export_dir, else WORKDIR/export/step_N) and returns the path."""
    ckpt = TrainCheckpointer(workdir, config.checkpoint, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint under {ckpt.directory} to export; train first")
        mesh = shd.make_mesh(config.mesh, devices)
        rules = shd.rules_from_config(config.mesh)

        def abstract_for(saved):
            return abstract_ema_params(with_saved_weights_config(config, saved).model, mesh, rules)

        # The newest checkpoint whose EMA weights verify (a damaged one is skipped, reported).
        latest, ema, saved = ckpt.restore_newest_good_ema(abstract_for)
        config = with_saved_weights_config(config, saved)
    finally:
        ckpt.close()
    output = output or config.checkpoint.get("export_dir") or os.path.join(
        workdir, "export", f"step_{latest}"
    )
    save_inference_checkpoint(output, ema, config.model, config.diffusion)
    logging.info("exported EMA parameters of step %d to %s", latest, output)
    return output
