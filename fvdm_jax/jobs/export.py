"""--mode=export: the EMA weights of WORKDIR's latest checkpoint as an inference checkpoint.

Only the EMA subtree is read (no optimizer state), restored onto its shardings; every process
writes its shards and process 0 the config.json, with the model and diffusion sections the
checkpoint was trained with (not the command line's).
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from fvdm_jax.checkpoint.inference import save_inference_checkpoint
from fvdm_jax.checkpoint.manager import TrainCheckpointer
from fvdm_jax.checkpoint.recipe import weights_config
from fvdm_jax.models.build import model_from_config, with_lora
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.training.state import abstract_ema_params, has_adapters


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

        def trained_model(saved):  # with the adapters of a LoRA run, as the checkpoint saved them
            lora_section = saved.get("lora") or config.get("lora")
            return with_lora(with_saved_weights_config(config, saved).model, lora_section)

        # The newest checkpoint whose EMA weights verify (a damaged one is skipped, reported).
        latest, ema, saved = ckpt.restore_newest_good_ema(
            lambda saved: abstract_ema_params(trained_model(saved), mesh, rules))
        model_config = trained_model(saved)
        config = with_saved_weights_config(config, saved)
    finally:
        ckpt.close()
    output = output or config.checkpoint.get("export_dir") or os.path.join(
        workdir, "export", f"step_{latest}"
    )
    model = model_from_config(model_config)
    if has_adapters(model):
        return _export_lora(config, model, ema, mesh, rules, output, latest)
    save_inference_checkpoint(output, ema, config.model, config.diffusion)
    logging.info("exported EMA parameters of step %d to %s", latest, output)
    return output


def _export_lora(config, model, ema, mesh, rules, output: str, step: int) -> str:
    """lora.export='merged': the EMA adapters folded into the frozen weights, an inference
    checkpoint of the plain model; 'adapter': OUT/lora.safetensors, Wan's original names."""
    from fvdm_jax.training.wan_init import merged_weights

    if config.lora.get("export", "merged") == "adapter":
        from fvdm_jax.convert.tensors import write_safetensors
        from fvdm_jax.convert.wan_lora import adapter_state_dict
        from fvdm_jax.runtime import files

        alpha = model.lora.alpha if model.lora.alpha is not None else model.lora.rank
        tensors = adapter_state_dict(jax.device_get(ema), alpha=float(alpha))
        if jax.process_index() == 0:
            files.makedirs(output)
            write_safetensors(os.path.join(output, "lora.safetensors"), tensors)
        logging.info("exported the EMA adapters of step %d to %s/lora.safetensors", step, output)
        return output
    merged = merged_weights(config, model, ema, mesh, rules)
    save_inference_checkpoint(output, merged, config.model, config.diffusion)
    logging.info("exported the EMA adapters of step %d merged into the base weights to %s",
                 step, output)
    return output
