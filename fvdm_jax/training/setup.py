"""Everything a train step is built from, derived from the config before any array exists: the
model (the DiT, or Wan with model.architecture='wan'), the diffusion schedule (a FlowSchedule
with diffusion.process='flow'), the optimizer, the mesh and rules, and the abstract sharded state."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from fvdm_jax.diffusion.flow import FlowSchedule
from fvdm_jax.diffusion.schedule import Schedule
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.build import model_from_config, with_lora
from fvdm_jax.models.wan import Wan
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.training.state import TrainState, abstract_state
from fvdm_jax.training.step import make_optimizer


@dataclasses.dataclass
class Setup:
    """Everything derived from the config before any array is allocated."""

    model: nn.Module  # DiT or Wan
    schedule: Schedule | FlowSchedule
    optimizer: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    state_shardings: Any
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    batch_shardings: dict


def build_setup(config, devices=None) -> Setup:
    model = model_from_config(with_lora(config.model, config.get("lora")))
    schedule = schedule_from_config(config.diffusion)
    optimizer = make_optimizer(config.train)
    mesh = shd.make_mesh(config.mesh, devices)
    rules = shd.rules_from_config(config.mesh)
    batch_size = int(config.train.batch_size)
    divisor = shd.batch_divisor(mesh, rules)
    micro = batch_size // int(config.train.grad_accum_steps)
    if micro % divisor or batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={batch_size} (micro-batch {micro}) must be divisible by the "
            f"data x fsdp mesh size {divisor} and by the {jax.process_count()} processes; change "
            f"train.batch_size or config.mesh.shape"
        )
    abstract, state_shardings = abstract_state(
        model, mesh, rules, optimizer, strict=shd.strict_from_config(config.mesh),
        seed=int(config.train.seed))
    batch_shardings = {
        "video": shd.batch_sharding(mesh, rules, 5),
        "label": shd.batch_sharding(mesh, rules, 1),
    }
    if isinstance(model, Wan):  # text_latents batches: the text tokens and their mask
        batch_shardings["context"] = shd.batch_sharding(mesh, rules, 3)
        batch_shardings["context_mask"] = shd.batch_sharding(mesh, rules, 2)
    return Setup(model, schedule, optimizer, mesh, rules, state_shardings, abstract, batch_shardings)


PROCESSES = ("vp", "flow")


def schedule_from_config(diffusion_config):
    """diffusion.process 'vp' (default): the discrete `Schedule`; 'flow': the `FlowSchedule`
    (num_timesteps, shift) of rectified flow."""
    process = diffusion_config.get("process") or "vp"
    if process not in PROCESSES:
        raise ValueError(f"diffusion.process={process!r} is not one of {PROCESSES}")
    if process == "flow":
        return FlowSchedule.from_config(diffusion_config)
    return Schedule.from_config(diffusion_config)
