"""The weights sampling and evaluation use: EMA parameters only, never the optimizer state.

`load_sampling_params` reads sample.checkpoint (an exported or converted inference checkpoint) or
the EMA subtree of WORKDIR's latest training checkpoint, restored straight onto its shardings.
"""

from __future__ import annotations

import logging

from fvdm_jax.models.build import model_from_config, with_lora
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.training.state import abstract_ema_params, has_adapters


def unwrap_params(params):
    """{'params': tree} or the bare tree -> {'params': tree}."""
    if params is None:
        return None
    return params if set(params.keys()) == {"params"} else {"params": params}


def load_sampling_params(config, workdir: str):
    """(model_config, diffusion_config, params {'params': ...}) for sampling.

    sample.checkpoint (an exported / converted inference checkpoint) wins; otherwise the EMA
    parameters of the latest checkpoint under WORKDIR/checkpoints with config.model.
    """
    from fvdm_jax.checkpoint.inference import load_inference_checkpoint
    from fvdm_jax.checkpoint.manager import TrainCheckpointer

    path = config.sample.get("checkpoint")
    if path:
        params, saved = load_inference_checkpoint(path)
        logging.info("sampling with the inference checkpoint %s", path)
        params = unwrap_params(params)
        lora_file = (config.get("lora") or {}).get("init_from")
        if lora_file:  # a LoRA file (Pusa's published one) folded in at lora.strength
            from fvdm_jax.convert.wan_lora import merge_lora_file

            strength = float(config.lora.get("strength", 1.0))
            params = merge_lora_file(params, saved["model"], lora_file, alpha=config.lora.get("alpha"),
                                     strength=strength)
            logging.info("with the LoRA %s at strength %g", lora_file, strength)
        return saved["model"], saved["diffusion"], params
    from fvdm_jax.checkpoint.recipe import weights_config

    ckpt = TrainCheckpointer(workdir, config.checkpoint, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no checkpoint under {ckpt.directory}: train first, or set "
                f"--config.sample.checkpoint=DIR (an exported or converted inference checkpoint)"
            )
        mesh, rules = shd.make_mesh(config.mesh), shd.rules_from_config(config.mesh)

        def trained_model(saved):  # with the adapters of a LoRA run
            return with_lora(weights_config(saved, config)[0], saved.get("lora") or config.get("lora"))

        # The newest checkpoint whose EMA weights verify (a damaged one is skipped, reported).
        latest, ema, saved = ckpt.restore_newest_good_ema(
            lambda saved: abstract_ema_params(trained_model(saved), mesh, rules))
        model_config, diffusion_config = weights_config(saved, config)
        model = model_from_config(trained_model(saved))
        if has_adapters(model):  # LoRA: the EMA adapters folded into the frozen weights
            from fvdm_jax.training.wan_init import merged_weights

            ema = merged_weights(config, model, ema, mesh, rules)
    finally:
        ckpt.close()
    logging.info("sampling with the EMA parameters of step %d (%s)", latest, ckpt.directory)
    return model_config, diffusion_config, ema
