"""The training state and its abstract, sharded form: one definition for every reader.

`abstract_state` is the one place that turns a model (and optimizer) into ShapeDtypeStructs
carrying their NamedShardings on a mesh: the loop restores and creates the state on it,
fine-tuning places pretrained weights on it, sampling and export restore the EMA weights onto
its `ema_params` (float32, whatever model.param_dtype is). Nothing is allocated.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fvdm_jax.models import lora
from fvdm_jax.models.build import init_inputs, model_from_config
from fvdm_jax.runtime import sharding as shd


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32: completed optimizer steps
    params: Any  # {'params': ...}
    ema_params: Any  # same tree, float32 EMA of params
    opt_state: Any
    first_nonfinite_step: jax.Array  # () int32: first step with a non-finite loss/grad, else -1
    # LoRA (a model with adapters): the frozen weights, {'params': ...} without the adapters;
    # params, ema_params and opt_state then hold the adapters alone. None otherwise. Never saved:
    # the loop restores a checkpoint without it and puts the base weights back.
    frozen: Any = None


def init_state(rng, model: nn.Module, optimizer, *, boxed: bool) -> TrainState:
    """A fresh state of a DiT or Wan model (its example inputs: models/build.py init_inputs);
    `boxed` keeps the logical-axis boxes (for computing shardings abstractly)."""
    params = model.init(rng, *init_inputs(model))
    if not boxed:
        params = nn.unbox(params)
    frozen = None
    if has_adapters(model):
        params, frozen = lora.split(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params),
        opt_state=optimizer.init(params),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
        frozen=frozen,
    )


def has_adapters(model) -> bool:
    """Whether the model carries LoRA adapters (training then updates only them)."""
    return getattr(getattr(model, "lora", None), "rank", 0) > 0


def abstract_state(model: nn.Module, mesh, rules, optimizer=None, *, strict: bool = False, seed: int = 0):
    """(abstract TrainState, its NamedShardings): ShapeDtypeStructs with their shardings from the
    parameters' logical axes and `rules` (`strict`: an axis that cannot be sharded is an error).
    optimizer None: no optimizer state (sampling, export and fine-tuning's sources need none)."""
    optimizer = optax.identity() if optimizer is None else optimizer
    rng = jax.random.key(seed)
    boxed = jax.eval_shape(lambda r: init_state(r, model, optimizer, boxed=True), rng)
    shardings = shd.logical_shardings(boxed, mesh, rules, strict=strict)
    init = jax.jit(lambda r: init_state(r, model, optimizer, boxed=False), out_shardings=shardings)
    return init.eval_shape(rng), shardings


def abstract_ema_params(model_config, mesh, rules) -> Any:
    """{'params': ...} of ShapeDtypeStructs with their shardings on `mesh`: the EMA weights of a
    checkpoint of `model_config` (float32), as sampling, export and fine-tuning restore them."""
    return abstract_state(model_from_config(model_config), mesh, rules)[0].ema_params
