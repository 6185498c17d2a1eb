"""PTSS, the probabilistic timestep sampling strategy of FVDM training, and its coin.

With probability p the frames of a video get per-frame timesteps; otherwise all frames share one
timestep. Who shares a coin is `ptss.mode`:
  per_batch   one coin per step for the whole global batch (the official code on one process);
  per_sample  one coin per video;
  per_device  one coin per data shard: the global batch splits into `coin_groups` contiguous,
              equal slices (the slices the devices hold, one per data x fsdp position of the
              mesh), each flipping its own coin. The official multi-GPU runs do this: every
              process flips one coin for its local batch.
The per-frame branch is uniform and independent per frame for the `ptss` scheme, a FoPP draw for
`ptss_fopp` (fvdm_jax/diffusion/schemes.py holds the registry of schemes).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

PTSS_MODES = ("per_batch", "per_sample", "per_device")

# (rng, batch_size, num_frames, num_timesteps) -> int (B, F): the per-frame branch of PTSS.
FrameDraw = Callable[[jax.Array, int, int, int], jnp.ndarray]


def uniform_frames(rng: jax.Array, batch_size: int, num_frames: int, num_timesteps: int) -> jnp.ndarray:
    """Every frame its own uniform timestep in [0, num_timesteps - 1]: int32 (B, F)."""
    return jax.random.randint(rng, (batch_size, num_frames), 0, num_timesteps)


def check_coin(p, mode: str, batch_size: int | None = None, coin_groups: int = 1) -> None:
    """ValueError naming the bad PTSS coin argument (a traced p is not checked; the split into
    data shards only when batch_size is given)."""
    if mode not in PTSS_MODES:
        raise ValueError(f"ptss.mode={mode!r} is not one of {PTSS_MODES}")
    if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
        raise ValueError(f"ptss.p={p} must lie in [0, 1]")
    if int(coin_groups) < 1:
        raise ValueError(f"coin_groups={coin_groups} must be >= 1 (the number of data shards)")
    if mode == "per_device" and batch_size is not None and batch_size % int(coin_groups):
        raise ValueError(
            f"ptss.mode=per_device: the batch of {batch_size} does not split into "
            f"{coin_groups} equal data shards; make train.batch_size a multiple of the mesh's "
            f"data x fsdp size"
        )


def ptss_coin(rng: jax.Array, batch_size: int, p, mode: str, coin_groups: int = 1) -> jnp.ndarray:
    """The coin (True = per-frame timesteps), broadcastable to (B, F): () for per_batch, (B, 1)
    otherwise; per_device repeats one coin over each of the `coin_groups` slices of the batch."""
    if mode == "per_batch":
        return jax.random.uniform(rng, ()) < p
    if mode == "per_sample":
        return jax.random.uniform(rng, (batch_size, 1)) < p
    groups = int(coin_groups)
    coin = jax.random.uniform(rng, (groups, 1)) < p  # (G, 1)
    return jnp.repeat(coin, batch_size // groups, axis=0)  # (B, 1): rows of a slice share it


def ptss_timesteps(
    rng: jax.Array,
    batch_size: int,
    num_frames: int,
    num_timesteps: int,
    p,
    mode: str = "per_batch",
    coin_groups: int = 1,
    per_frame: FrameDraw = uniform_frames,
) -> jnp.ndarray:
    """PTSS with any per-frame branch: int32 (B, F) in [0, num_timesteps - 1]; pure, jit-safe.

    Where the coin says so a video takes `per_frame`'s timesteps, elsewhere one timestep shared
    by all its frames (uniform). p may be a Python float or a traced scalar in [0, 1].
    """
    check_coin(p, mode, batch_size, coin_groups)
    # The key split and draw order are those of every earlier version: a run with the default
    # scheme draws the same timesteps for the same seed and step.
    key_shared, key_frames, key_coin = jax.random.split(rng, 3)
    shape = (batch_size, num_frames)
    shared = jax.random.randint(key_shared, (batch_size, 1), 0, num_timesteps)
    frames = per_frame(key_frames, batch_size, num_frames, num_timesteps)
    coin = ptss_coin(key_coin, batch_size, p, mode, coin_groups)
    return jnp.where(coin, frames, jnp.broadcast_to(shared, shape)).astype(jnp.int32)
