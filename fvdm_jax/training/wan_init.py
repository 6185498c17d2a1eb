"""Fine-tuning a Wan model from released weights (`train.init_from`), fully or with LoRA.

train.init_from names an inference checkpoint of the same Wan model (`python -m fvdm_jax.convert
wan`'s output, or an export). Its weights are restored straight onto their shardings, in
model.param_dtype (bf16 stays bf16):
- full fine-tuning: they are the first parameters; the EMA starts equal to them (float32), the
  optimizer afresh, at step 0;
- LoRA (lora.rank > 0): they are the frozen weights (`TrainState.frozen`), put back at every
  start, resumed or not (checkpoints hold the adapters alone); the adapters start fresh (B = 0:
  the first step's model is the released one) or from `lora.init_from`, a LoRA file
  (fvdm_jax/convert/wan_lora.py: peft or Wan's original names, Pusa's published LoRA).
Without train.init_from a LoRA run's frozen weights are the seed's initialization (tests).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime import files
from fvdm_jax.training.state import TrainState, init_state


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def fresh_state(setup, seed: int) -> TrainState:
    """The state creation makes (the loop's create_state), directly sharded."""
    init = jax.jit(lambda r: init_state(r, setup.model, setup.optimizer, boxed=False),
                   out_shardings=setup.state_shardings)
    return init(jax.random.key(seed))


def restore_weights(path: str, abstract) -> dict:
    """The {'params': ...} of the inference checkpoint at `path` onto `abstract` (its shapes,
    dtypes and shardings); a checkpoint of another model is one ConfigError line."""
    from fvdm_jax.checkpoint.inference import load_inference_checkpoint

    try:
        params, _ = load_inference_checkpoint(files.resolve(path), target=abstract)
    except FileNotFoundError as error:
        raise ConfigError(f"train.init_from={path}: {_one_line(error)}; give an inference "
                          f"checkpoint (python -m fvdm_jax.convert wan --output=DIR)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"train.init_from={path} does not hold this Wan model's weights "
                          f"({_one_line(error)}); convert the weights of the configured size") from None
    return params


def base_weights(setup, config):
    """The frozen weights of a LoRA run on their shardings: train.init_from's, else the seed's."""
    path = config.train.get("init_from")
    abstract = setup.abstract_state.frozen
    if path:
        return restore_weights(str(path), abstract)
    return fresh_state(setup, int(config.train.seed)).frozen


def adapters_from_file(setup, config):
    """lora.init_from's adapters as {'params': ...} on the adapters' shardings (float32 copies
    for the EMA are made by the caller)."""
    from fvdm_jax.convert.wan_lora import adapters_from_state_dict, read_lora_file

    path, model = str(config.lora.init_from), setup.model
    try:
        sd = read_lora_file(files.resolve(path))
    except FileNotFoundError:
        raise ConfigError(f"lora.init_from={path} does not exist; give a LoRA .safetensors / "
                          f".pt file") from None
    adapters, rank, alpha, _ = adapters_from_state_dict(
        sd, num_layers=model.num_layers, dim=model.dim, num_heads=model.num_heads,
        ffn_dim=model.ffn_dim)
    if rank != model.lora.rank:
        raise ConfigError(f"lora.init_from={path} has rank {rank} but lora.rank="
                          f"{model.lora.rank}; set lora.rank={rank}")
    if alpha is not None and model.lora.alpha is not None and alpha != model.lora.alpha:
        logging.warning("lora.init_from=%s states alpha %g; lora.alpha=%g is used", path, alpha,
                        model.lora.alpha)
    abstract = setup.abstract_state.params
    tree = {"params": adapters}
    if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(abstract):
        raise ConfigError(f"lora.init_from={path} adapts other layers than lora.targets="
                          f"{tuple(model.lora.targets)}; set lora.targets to the file's")
    return jax.tree_util.tree_map(
        lambda a, s: jax.device_put(np.asarray(a, s.dtype), s.sharding), tree, abstract)


def first_state(setup, config) -> TrainState:
    """The first state of a Wan fine-tuning run (module docstring)."""
    seed = int(config.train.seed)
    if setup.abstract_state.frozen is None:  # full fine-tuning
        weights = restore_weights(str(config.train.init_from), setup.abstract_state.params)

        def build(params):
            ema = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                              opt_state=setup.optimizer.init(params),
                              first_nonfinite_step=jnp.full((), -1, jnp.int32))

        state = jax.jit(build, out_shardings=setup.state_shardings)(weights)
        logging.info("fine-tuning from %s (every weight)", config.train.init_from)
        return state
    state = fresh_state(setup, seed)
    if config.train.get("init_from"):
        state = state.replace(frozen=base_weights(setup, config))
    if config.lora.get("init_from"):
        adapters = adapters_from_file(setup, config)
        ema = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), adapters)
        state = state.replace(params=adapters, ema_params=ema,
                              opt_state=jax.jit(setup.optimizer.init,
                                                out_shardings=setup.state_shardings.opt_state)(adapters))
    logging.info("LoRA rank %d on %s; frozen weights from %s", setup.model.lora.rank,
                 ", ".join(setup.model.lora.targets), config.train.get("init_from") or "the seed")
    return state


def lora_base(config, model, mesh, rules):
    """The frozen weights of a LoRA run of `model` (with adapters) on `mesh`: train.init_from's,
    else the seed's initialization, as the run trained on them."""
    import optax

    from fvdm_jax.training.state import abstract_state

    seed = int(config.train.seed)
    abstract, shardings = abstract_state(model, mesh, rules, seed=seed)
    path = config.train.get("init_from")
    if path:
        return restore_weights(str(path), abstract.frozen)
    init = jax.jit(lambda r: init_state(r, model, optax.identity(), boxed=False).frozen,
                   out_shardings=shardings.frozen)
    return init(jax.random.key(seed))


def merged_weights(config, model, ema, mesh, rules):
    """{'params': ...} of a LoRA run's EMA adapters folded into its frozen weights
    (W + alpha / r A B, in the weights' dtype): a plain model's weights."""
    import dataclasses

    from fvdm_jax.models import lora

    base = lora_base(config, model, mesh, rules)
    alpha = model.lora.alpha if model.lora.alpha is not None else model.lora.rank
    strength = float(config.lora.get("strength", 1.0))
    scaled = dataclasses.replace(model.lora, alpha=float(alpha) * strength)
    return jax.jit(lambda b, a: lora.merge(lora.join(b, a), scaled))(base, ema)
