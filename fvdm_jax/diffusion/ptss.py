"""PTSS, the probabilistic timestep sampling strategy of FVDM training.

With probability p the frames of a video get independent timesteps; otherwise all frames share
one timestep. The official code flips ONE coin per step for the whole (process-local) batch
('per_batch'); 'per_sample' flips one coin per video.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PTSS_MODES = ("per_batch", "per_sample")


def sample_frame_timesteps(
    rng: jax.Array,
    batch_size: int,
    num_frames: int,
    num_timesteps: int,
    p,
    mode: str = "per_batch",
) -> jnp.ndarray:
    """Integer frame timesteps (B, F) in [0, num_timesteps - 1]; pure, usable inside jit.

    p may be a Python float or a traced scalar in [0, 1].
    """
    if mode not in PTSS_MODES:
        raise ValueError(f"ptss.mode={mode!r} is not one of {PTSS_MODES}")
    if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
        raise ValueError(f"ptss.p={p} must lie in [0, 1]")
    key_shared, key_frames, key_coin = jax.random.split(rng, 3)
    shape = (batch_size, num_frames)
    shared = jax.random.randint(key_shared, (batch_size, 1), 0, num_timesteps)
    independent = jax.random.randint(key_frames, shape, 0, num_timesteps)
    coin_shape = () if mode == "per_batch" else (batch_size, 1)
    coin = jax.random.uniform(key_coin, coin_shape) < p
    return jnp.where(coin, independent, jnp.broadcast_to(shared, shape)).astype(jnp.int32)
