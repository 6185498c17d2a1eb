"""The rectified-flow objective of a train step for a text-conditioned Wan model.

`flow_objective(state, batch)` draws what one step needs from fold_in(train.seed, step), as the
VP step does: per-frame training indices with the ptss.scheme registry
(fvdm_jax/diffusion/schemes.py; their levels are the shifted grid of
fvdm_jax/diffusion/flow.py), the noise, and the text dropout of classifier-free guidance training
(train.text_dropout_prob: a dropped video's context becomes zeros, all of its tokens attended, as
the sampler's zero null context). It returns loss_fn(params, video, index, noise, context,
context_mask) -> (loss, {'loss', 'mse'}) with its batch-major inputs; training/step.py
(`flow_train_step`) takes the gradients, accumulates micro-batches and updates the state exactly
as for the DiT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fvdm_jax.diffusion.flow import FlowSchedule, flow_loss
from fvdm_jax.diffusion.schemes import draw_frame_timesteps

FLOW_AUX_KEYS = ("loss", "mse")


def drop_text(key, context, context_mask, prob: float):
    """Each video's context (B, L, D) replaced by zeros with probability `prob` (its mask (B, L),
    if any, then all True). Returns (context, context_mask)."""
    keep = jax.random.uniform(key, (context.shape[0],)) >= prob
    context = jnp.where(keep[:, None, None], context, jnp.zeros_like(context))
    if context_mask is not None:
        context_mask = context_mask | ~keep[:, None]
    return context, context_mask


def flow_objective(state, batch: Mapping[str, jax.Array], *, model, schedule: FlowSchedule,
                   train: Mapping[str, Any], ptss: Mapping[str, Any], coin_groups: int = 1):
    """(loss_fn, inputs) of one step on a global batch {'video': (B, F, h, w, C) latents,
    'context': (B, L, D), 'context_mask': (B, L) bool (optional)}; see the module docstring."""
    if "context" not in batch:
        raise ValueError(f"the flow train step needs text contexts in the batch (data.source="
                         f"text_latents); the batch has {sorted(batch)}")
    rng = jax.random.fold_in(jax.random.key(int(train["seed"])), state.step)
    key_t, key_noise, key_text = jax.random.split(rng, 3)
    video = batch["video"].astype(jnp.float32)
    b, f = video.shape[:2]
    index = draw_frame_timesteps(key_t, b, f, schedule.num_timesteps, ptss, coin_groups)
    noise = jax.random.normal(key_noise, video.shape, jnp.float32)
    context = batch["context"].astype(jnp.float32)
    mask = batch.get("context_mask")
    mask = None if mask is None else mask.astype(bool)
    prob = float(train.get("text_dropout_prob", 0.0) or 0.0)
    if prob > 0:
        context, mask = drop_text(key_text, context, mask, prob)

    def loss_fn(params, video, index, noise, context, mask):
        def model_fn(x_t, t):
            return model.apply(params, x_t, t, context, mask)

        terms = flow_loss(model_fn, schedule, video, index, noise)
        return terms["loss"], {k: terms[k] for k in FLOW_AUX_KEYS}

    return loss_fn, (video, index, noise, context, mask)
