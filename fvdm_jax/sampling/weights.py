"""The weights sampling and evaluation use: EMA parameters only, never the optimizer state.

`load_sampling_params` reads sample.checkpoint (an exported or converted inference checkpoint) or
the EMA subtree of WORKDIR's latest training checkpoint, restored straight onto its shardings.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from fvdm_jax import sharding as shd
from fvdm_jax.models.dit import model_from_config


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
    from fvdm_jax.checkpoint import TrainCheckpointer, load_inference_checkpoint

    path = config.sample.get("checkpoint")
    if path:
        params, saved = load_inference_checkpoint(path)
        logging.info("sampling with the inference checkpoint %s", path)
        return saved["model"], saved["diffusion"], unwrap_params(params)
    from fvdm_jax.recipe import weights_config

    ckpt = TrainCheckpointer(workdir, config.checkpoint, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no checkpoint under {ckpt.directory}: train first, or set "
                f"--config.sample.checkpoint=DIR (an exported or converted inference checkpoint)"
            )
        mesh, rules = shd.make_mesh(config.mesh), shd.rules_from_config(config.mesh)

        def abstract_for(saved):
            return abstract_params(weights_config(saved, config)[0], mesh, rules)

        # The newest checkpoint whose EMA weights verify (a damaged one is skipped, reported).
        latest, ema, saved = ckpt.restore_newest_good_ema(abstract_for)
        model_config, diffusion_config = weights_config(saved, config)
    finally:
        ckpt.close()
    logging.info("sampling with the EMA parameters of step %d (%s)", latest, ckpt.directory)
    return model_config, diffusion_config, ema


def abstract_params(model_config, mesh, rules):
    """{'params': ...} of ShapeDtypeStructs with their logical shardings on `mesh`, in float32
    (the dtype of the EMA weights, whatever model.param_dtype is)."""
    model = model_from_config(model_config)
    boxed = boxed_params(model, model_config)
    shardings = shd.logical_shardings(boxed, mesh, rules)

    def abstract(a, sharding):
        dtype = jnp.float32 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype
        return jax.ShapeDtypeStruct(a.shape, dtype, sharding=sharding)

    return jax.tree_util.tree_map(abstract, nn.meta.unbox(boxed), shardings)


def boxed_params(model, model_config):
    """The model's parameter tree of ShapeDtypeStructs, boxed with logical axis names."""
    f, h, c = (int(model_config[k]) for k in ("num_frames", "input_size", "in_channels"))
    labels = jnp.zeros((1,), jnp.int32) if int(model_config.get("num_classes") or 0) else None
    return jax.eval_shape(
        lambda r: model.init(r, jnp.zeros((1, f, h, h, c)), jnp.zeros((1, f)), labels),
        jax.random.key(0),
    )
