"""The train state, the optimizer, and the pure jitted FVDM train step (knows nothing of files).

train_step(state, batch) -> (state, metrics): frame timesteps (the ptss.scheme registry of
fvdm_jax/diffusion/schemes.py), noise, label dropout, the hybrid loss, gradients (optionally
accumulated over micro-batches), global-norm clipping from a configured step (the official
behaviour), AdamW, EMA, and an on-device record of the first step whose loss or gradient was
not finite. flow_train_step: the same update (`update_step`) on the rectified-flow objective of
a text-conditioned Wan model (training/flow_step.py); JittedTrainStep picks it for a FlowSchedule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fvdm_jax.diffusion.flow import FlowSchedule
from fvdm_jax.diffusion.losses import training_losses
from fvdm_jax.diffusion.ptss import PTSS_MODES
from fvdm_jax.diffusion.schedule import Schedule
from fvdm_jax.diffusion.schemes import SCHEMES, draw_frame_timesteps
from fvdm_jax.errors import ConfigError
from fvdm_jax.models import lora
from fvdm_jax.models.dit import DiT, drop_labels
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.training.flow_step import FLOW_AUX_KEYS, flow_objective
from fvdm_jax.training.state import TrainState

LR_SCHEDULES = ("constant", "warmup_cosine")


def validate_train_config(train: Mapping[str, Any], ptss: Mapping[str, Any]):
    if train["schedule"] not in LR_SCHEDULES:
        raise ConfigError(f"train.schedule={train['schedule']!r} is not one of {LR_SCHEDULES}")
    for key in ("num_steps", "batch_size", "grad_accum_steps", "log_every_steps"):
        if int(train[key]) < 1:
            raise ConfigError(f"train.{key}={train[key]} must be at least 1")
    if train["batch_size"] % train["grad_accum_steps"]:
        raise ConfigError(
            f"train.batch_size={train['batch_size']} is not divisible by "
            f"train.grad_accum_steps={train['grad_accum_steps']}"
        )
    if not 0.0 <= float(train["ema_decay"]) <= 1.0:
        raise ConfigError(f"train.ema_decay={train['ema_decay']} must lie in [0, 1]")
    if not float(train["lr"]) > 0.0:
        raise ConfigError(f"train.lr={train['lr']} must be > 0")
    for key in ("end_lr", "weight_decay", "warmup_steps", "grad_clip_start_step"):
        if not float(train[key]) >= 0.0:
            raise ConfigError(f"train.{key}={train[key]} must be >= 0")
    for key in ("b1", "b2"):
        if not 0.0 <= float(train[key]) < 1.0:
            raise ConfigError(f"train.{key}={train[key]} must lie in [0, 1)")
    if not float(train["eps"]) > 0.0:
        raise ConfigError(f"train.eps={train['eps']} must be > 0")
    if ptss.get("scheme", "ptss") not in SCHEMES:
        raise ConfigError(f"ptss.scheme={ptss['scheme']!r} is not one of {tuple(SCHEMES)}")
    if ptss["mode"] not in PTSS_MODES:
        raise ConfigError(f"ptss.mode={ptss['mode']!r} is not one of {PTSS_MODES}")
    if not 0.0 <= float(ptss["p"]) <= 1.0:
        raise ConfigError(f"ptss.p={ptss['p']} must lie in [0, 1]")


def learning_rate_schedule(train: Mapping[str, Any]) -> optax.Schedule:
    """'constant' (after an optional linear warmup) or 'warmup_cosine' down to train.end_lr."""
    lr, warmup = float(train["lr"]), int(train["warmup_steps"])
    if train["schedule"] == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(int(train["num_steps"]), warmup + 1), float(train["end_lr"])
        )
    if warmup > 0:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    return optax.constant_schedule(lr)


def make_optimizer(train: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW as torch.optim.AdamW (eps added to sqrt of the bias-corrected second moment)."""
    return optax.adamw(
        learning_rate_schedule(train),
        b1=float(train["b1"]),
        b2=float(train["b2"]),
        eps=float(train["eps"]),
        weight_decay=float(train["weight_decay"]),
    )


def _split_micro(x, num_micro):
    """(B, ...) -> (num_micro, B / num_micro, ...)."""
    return x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation,
                    train: Mapping[str, Any]):
    """The update of one step from its gradients: torch's clip_grad_norm_ from
    train.grad_clip_start_step on, AdamW, then the EMA of the new parameters.
    Returns (params, ema_params, opt_state, grad_norm before clipping, updates)."""
    grad_norm = optax.tree.norm(grads)
    clip = float(train["grad_clip"])
    if clip > 0:
        # torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) when the norm exceeds it,
        # only from grad_clip_start_step on (the official recipe starts clipping late).
        active = state.step >= int(train["grad_clip_start_step"])
        scale = jnp.where(active, jnp.minimum(1.0, clip / (grad_norm + 1e-6)), 1.0)
        grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = float(train["ema_decay"])
    ema = jax.tree_util.tree_map(
        lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), state.ema_params, params
    )
    return params, ema, opt_state, grad_norm, updates


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model: DiT,
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    train: Mapping[str, Any],
    ptss: Mapping[str, Any],
    coin_groups: int = 1,
):
    """One optimizer step on a global batch {'video': (B, F, H, W, C), 'label': (B,)}.
    coin_groups: the number of data shards the batch is split into (ptss.mode=per_device flips
    one coin per shard; `data_shards` derives it from the batch sharding)."""
    rng = jax.random.fold_in(jax.random.key(int(train["seed"])), state.step)
    key_t, key_noise, key_label = jax.random.split(rng, 3)
    video = batch["video"].astype(jnp.float32)
    b, f = video.shape[:2]
    tau = draw_frame_timesteps(key_t, b, f, schedule.num_timesteps, ptss, coin_groups)
    noise = jax.random.normal(key_noise, video.shape, jnp.float32)
    labels = None
    if model.num_classes > 0:
        labels = batch["label"].astype(jnp.int32)
        if model.class_dropout_prob > 0:
            labels = drop_labels(key_label, labels, model.class_dropout_prob, model.num_classes)

    def loss_fn(params, video, tau, noise, labels):
        def model_fn(x_t, t):
            return model.apply(params, x_t, t, labels)

        terms = training_losses(
            schedule, model_fn, video, tau, noise, learn_sigma=model.learn_sigma
        )
        means = {k: jnp.mean(terms[k]) for k in ("loss", "mse", "vb") if k in terms}
        return means["loss"], means

    keys = ("loss", "mse", "vb") if model.learn_sigma else ("loss", "mse")
    return update_step(state, loss_fn, (video, tau, noise, labels), keys,
                       optimizer=optimizer, train=train)


def update_step(state: TrainState, loss_fn, inputs: tuple, aux_keys: tuple, *,
                optimizer: optax.GradientTransformation, train: Mapping[str, Any]):
    """The part of a train step every objective shares: gradients of
    loss_fn(params, *inputs) -> (loss, {aux_keys: means}) (accumulated over
    train.grad_accum_steps micro-batches of the batch-major `inputs`; None entries stay None),
    `apply_gradients`, and the on-device non-finite record. Returns (state, metrics)."""
    if state.frozen is not None:  # LoRA: gradients of the adapters only, the base held fixed
        full_loss = loss_fn

        def loss_fn(adapters, *xs):
            return full_loss(lora.join(state.frozen, adapters), *xs)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    num_micro = int(train["grad_accum_steps"])
    if num_micro == 1:
        (_, aux), grads = grad_fn(state.params, *inputs)
    else:
        # Micro-batches are slices of the global batch (PTSS and noise drawn for all of it), so
        # accumulation changes memory, not the maths: the mean of micro-batch means.
        micro = tuple(
            _split_micro(a, num_micro) if a is not None else None
            for a in inputs
        )

        def accumulate(carry, xs):
            (_, aux), grads = grad_fn(state.params, *xs)
            return jax.tree_util.tree_map(jnp.add, carry, (grads, aux)), None

        zeros = (
            jax.tree_util.tree_map(jnp.zeros_like, state.params),
            {k: jnp.zeros((), jnp.float32) for k in aux_keys},
        )
        (grads, aux), _ = jax.lax.scan(accumulate, zeros, micro)
        grads, aux = jax.tree_util.tree_map(lambda a: a / num_micro, (grads, aux))

    params, ema, opt_state, grad_norm, updates = apply_gradients(state, grads, optimizer, train)
    # The update norm catches blow-ups the loss does not show yet (e.g. a NaN learning rate).
    finite = (
        jnp.isfinite(aux["loss"])
        & jnp.isfinite(grad_norm)
        & jnp.isfinite(optax.tree.norm(updates))
    )
    first_bad = jnp.where(
        (state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step
    )
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema,
        opt_state=opt_state,
        first_nonfinite_step=first_bad,
        frozen=state.frozen,
    )
    metrics = dict(aux, grad_norm=grad_norm, lr=learning_rate_schedule(train)(state.step))
    return new_state, metrics


def flow_train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model,
                    schedule: FlowSchedule, optimizer: optax.GradientTransformation,
                    train: Mapping[str, Any], ptss: Mapping[str, Any], coin_groups: int = 1):
    """One rectified-flow optimizer step of a text-conditioned (Wan) model on a global batch
    {'video': (B, F, h, w, C) latents, 'context': (B, L, D), 'context_mask': (B, L), ...}: the
    objective of training/flow_step.py, then the same update as `train_step`."""
    loss_fn, inputs = flow_objective(state, batch, model=model, schedule=schedule, train=train,
                                     ptss=ptss, coin_groups=coin_groups)
    return update_step(state, loss_fn, inputs, FLOW_AUX_KEYS, optimizer=optimizer, train=train)


def data_shards(batch_shardings) -> int:
    """How many slices the batch axis of the batch sharding cuts the global batch into (the data
    x fsdp size by default; devices along other axes hold the same slice); 1 without a mesh."""
    leaves = jax.tree_util.tree_leaves(batch_shardings)
    sharding = next((s for s in leaves if isinstance(s, jax.sharding.NamedSharding)), None)
    if sharding is None or not len(sharding.spec) or sharding.spec[0] is None:
        return 1
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    return math.prod(int(sharding.mesh.shape[a]) for a in axes)


def _mesh_of(shardings):
    for leaf in jax.tree_util.tree_leaves(shardings):
        if isinstance(leaf, jax.sharding.NamedSharding):
            return leaf.mesh
    return None


class JittedTrainStep:
    """The jitted, sharded, state-donating train step; `traces` counts its compilations.

    The step is traced (called, lowered) inside `shd.activation_context(mesh, rules)`, so the
    model's logical activation constraints take effect. `mesh` defaults to the mesh of the
    shardings; `rules` are config.mesh.rules (`setup.rules`). Without a mesh (no NamedShardings
    given) the constraints stay no-ops.
    `coin_groups` (ptss.mode=per_device: one coin per data shard) defaults to `data_shards` of
    the batch shardings.
    """

    def __init__(
        self,
        model,
        schedule,
        optimizer,
        train,
        ptss,
        state_shardings,
        batch_shardings,
        *,
        rules,
        mesh=None,
        coin_groups=None,
    ):
        self.traces = 0
        self.coin_groups = int(coin_groups) if coin_groups is not None else data_shards(batch_shardings)
        self.mesh = mesh if mesh is not None else _mesh_of((batch_shardings, state_shardings))
        self.rules = tuple(rules)

        # The objective follows the process: rectified flow (a FlowSchedule) or the VP one.
        step_fn = flow_train_step if isinstance(schedule, FlowSchedule) else train_step

        def step(state, batch):
            self.traces += 1  # runs only while tracing
            return step_fn(
                state,
                batch,
                model=model,
                schedule=schedule,
                optimizer=optimizer,
                train=train,
                ptss=ptss,
                coin_groups=self.coin_groups,
            )

        self._jitted = jax.jit(
            step,
            in_shardings=(state_shardings, batch_shardings),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,) if bool(train.get("donate_state", True)) else (),
        )

    def context(self):
        """The activation-sharding context the step is traced in (a null context without mesh)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        return shd.activation_context(self.mesh, self.rules)

    def __call__(self, state: TrainState, batch):
        with self.context():
            return self._jitted(state, batch)

    def lower(self, state, batch):
        with self.context():
            return self._jitted.lower(state, batch)
