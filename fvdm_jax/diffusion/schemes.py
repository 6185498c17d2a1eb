"""Training timestep schemes: how the per-frame timesteps tau (B, F) of a training step are drawn.

A scheme is a pure, jit-safe function (rng, batch_size, num_frames, num_timesteps, cfg) -> int32
(B, F) in [0, num_timesteps - 1]; `SCHEMES` is the registry and `ptss.scheme` picks one. cfg is a
mapping with 'p' and 'mode' (read by the schemes with a coin, `COIN_SCHEMES`) and 'coin_groups'
(the number of data shards, for mode per_device; default 1).

  ptss         FVDM's PTSS (the default): with probability p every frame its own uniform
               timestep, else one shared by all frames; the coin as ptss.mode says.
  independent  Diffusion Forcing: every frame its own uniform timestep (PTSS at p = 1).
  fopp         AR-Diffusion's FoPP (arXiv 2503.07418): timesteps non-decreasing along the frames
               (earlier frames are never noisier), drawn as `fopp_timesteps` explains.
  ptss_fopp    PTSS whose per-frame branch is a FoPP draw: shared with probability 1 - p, else
               non-decreasing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.diffusion.ptss import check_coin, ptss_timesteps, uniform_frames

Scheme = Callable[[jax.Array, int, int, int, Mapping[str, Any]], jnp.ndarray]


# ---------------------------------------------------------------------------------------------
# FoPP.


def _uniform_nondecreasing(rng, count, num_values, max_count: int, max_values: int):
    """(B, max_count) int32 whose first count[b] entries are a non-decreasing sequence in
    [0, num_values[b] - 1], every such sequence equally likely (the rest is unspecified).

    Stars and bars: sorted k-subsets s_0 < ... < s_{k-1} of {0, ..., m + k - 2} map one-to-one
    onto non-decreasing sequences x_i = s_i - i in {0, ..., m - 1}. The k slots with the smallest
    random keys among the m + k - 1 valid ones are a uniform k-subset. Keys are 64 bits (two
    words) with the top bit of valid ones cleared, so every invalid slot sorts after every valid
    one and ties (probability ~1e-14 per draw) are the only inexactness.
    """
    batch = count.shape[0]
    slots = max_values + max_count - 1
    key_hi, key_lo = jax.random.split(rng)
    position = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots))
    valid = position < (num_values + count - 1)[:, None]
    hi = jnp.where(valid, jax.random.bits(key_hi, (batch, slots), jnp.uint32) >> 1,
                   jnp.uint32(0xFFFFFFFF))
    lo = jax.random.bits(key_lo, (batch, slots), jnp.uint32)
    _, _, order = jax.lax.sort((hi, lo, position), dimension=1, num_keys=2)
    rank = jnp.arange(max_count, dtype=jnp.int32)[None, :]
    chosen = jnp.where(rank < count[:, None], order[:, :max_count], slots)  # (B, K)
    return jnp.sort(chosen, axis=1) - rank


def fopp_paths(rng: jax.Array, anchor_frame, anchor_timestep, num_frames: int,
               num_timesteps: int) -> jnp.ndarray:
    """Non-decreasing timesteps (B, F) through the anchors (frame anchor_frame[b] at timestep
    anchor_timestep[b], both int (B,)), uniform over all such paths; int32, jit-safe."""
    anchor_frame = jnp.asarray(anchor_frame, jnp.int32)
    anchor_t = jnp.asarray(anchor_timestep, jnp.int32)
    if num_frames == 1:
        return anchor_t[:, None]
    key_before, key_after = jax.random.split(rng)
    k = num_frames - 1
    # Frames before the anchor: a non-decreasing sequence in [0, a]; after it, one in [a, T - 1].
    before = _uniform_nondecreasing(key_before, anchor_frame, anchor_t + 1, k, num_timesteps)
    after = anchor_t[:, None] + _uniform_nondecreasing(
        key_after, k - anchor_frame, num_timesteps - anchor_t, k, num_timesteps)
    frame = jnp.arange(num_frames, dtype=jnp.int32)[None, :]  # (1, F)
    f = anchor_frame[:, None]
    from_before = jnp.take_along_axis(before, jnp.clip(frame, 0, k - 1), axis=1)
    from_after = jnp.take_along_axis(after, jnp.clip(frame - f - 1, 0, k - 1), axis=1)
    tau = jnp.where(frame < f, from_before, jnp.where(frame == f, anchor_t[:, None], from_after))
    return tau.astype(jnp.int32)


def fopp_timesteps(rng: jax.Array, batch_size: int, num_frames: int,
                   num_timesteps: int) -> jnp.ndarray:
    """FoPP timesteps: int32 (B, F), non-decreasing along the frames; pure, jit-safe.

    What can be asked of it. A scheme cannot be non-decreasing AND give every frame a uniform
    marginal unless all frames share one timestep: t_j <= t_{j+1} with equal laws gives
    E[t_{j+1} - t_j] = 0 for a non-negative difference, so t_{j+1} = t_j almost surely. FoPP
    keeps the order exact and makes uniform what can be: the timestep of whichever frame it is
    oriented on.

    The draw (AR-Diffusion's construction): an anchor frame f ~ U{0..F-1} and its timestep
    a ~ U{0..T-1}; then a path chosen uniformly among all non-decreasing paths through (f, a):
    frames 0..f-1 a non-decreasing sequence in [0, a], frames f+1..F-1 one in [a, T-1]. The paper
    walks from the anchor frame by frame, taking each next timestep s with probability
    proportional to the number of valid completions from s (a dynamic-programming count,
    C(T-1-s + r, r) with r frames left after it); that product of ratios telescopes to
    1 / (number of completions), i.e. a uniform path. This draws the same uniform path in one
    shot (`_uniform_nondecreasing`: stars and bars), with no floating-point counts.

    So, exactly: (1) every draw is non-decreasing; (2) P(t_j = k | the anchor is j) = 1/T for
    every frame j; (3) given the anchor, every path through it is equally likely; (4) frame j's
    marginal is (1/F) [U{0..T-1} + sum over f != j of its law given anchor f], tilted towards 0 for
    early frames and towards T-1 for late ones; `fopp_marginals` computes it exactly, and by the
    symmetry (j, t) -> (F-1-j, T-1-t), E[t_j] + E[t_{F-1-j}] = T - 1.
    """
    key_frame, key_t, key_path = jax.random.split(rng, 3)
    anchor_frame = jax.random.randint(key_frame, (batch_size,), 0, num_frames)
    anchor_t = jax.random.randint(key_t, (batch_size,), 0, num_timesteps)
    return fopp_paths(key_path, anchor_frame, anchor_t, num_frames, num_timesteps)


def _log_comb(n, k):
    from scipy.special import gammaln

    return gammaln(np.asarray(n, np.float64) + 1) - gammaln(k + 1.0) - gammaln(np.asarray(n, np.float64) - k + 1)


def fopp_marginals(num_frames: int, num_timesteps: int) -> np.ndarray:
    """The exact per-frame marginals of `fopp_timesteps`: float64 (F, T), row j = P(t_j = k).

    Computed the paper's way, independently of the sampler: from a uniform anchor, walk forward
    with P(t_{i+1} = s | t_i = t) proportional to d_{i+1}(s) = C(T-1-s + r, r) over s >= t (r
    frames after frame i+1), backward with P(t_i = s | t_{i+1} = t) proportional to C(s + i, i)
    over s <= t (the i frames before frame i); average over the anchors.
    Each step is a cumulative sum (O(T)), so F = 16, T = 1000 takes milliseconds.
    """
    n, t_count = int(num_frames), int(num_timesteps)
    values = np.arange(t_count)
    out = np.zeros((n, t_count))
    for anchor in range(n):
        dist = np.full(t_count, 1.0 / t_count)
        out[anchor] += dist
        for i in range(anchor + 1, n):  # frame i-1 -> frame i, s >= t
            r = n - 1 - i
            weight = np.exp(_log_comb(t_count - 1 - values + r, r) - _log_comb(t_count - 1 + r, r))
            norm = np.cumsum(weight[::-1])[::-1]  # sum over s >= t
            dist = weight * np.cumsum(dist / norm)
            out[i] += dist
        dist = np.full(t_count, 1.0 / t_count)
        for i in range(anchor - 1, -1, -1):  # frame i+1 -> frame i, s <= t
            weight = np.exp(_log_comb(values + i, i) - _log_comb(t_count - 1 + i, i))
            norm = np.cumsum(weight)  # sum over s <= t
            dist = weight * np.cumsum((dist / norm)[::-1])[::-1]
            out[i] += dist
    return out / n


# ---------------------------------------------------------------------------------------------
# The registry.


def _coin(cfg: Mapping[str, Any]):
    return cfg["p"], cfg.get("mode", "per_batch"), int(cfg.get("coin_groups", 1) or 1)


def ptss_scheme(rng, batch_size: int, num_frames: int, num_timesteps: int, cfg) -> jnp.ndarray:
    """FVDM's PTSS: per-frame uniform timesteps with probability p, else one per video."""
    p, mode, groups = _coin(cfg)
    return ptss_timesteps(rng, batch_size, num_frames, num_timesteps, p, mode, groups)


def independent_scheme(rng, batch_size: int, num_frames: int, num_timesteps: int, cfg) -> jnp.ndarray:
    """Diffusion Forcing: every frame its own uniform timestep."""
    del cfg
    return uniform_frames(rng, batch_size, num_frames, num_timesteps).astype(jnp.int32)


def fopp_scheme(rng, batch_size: int, num_frames: int, num_timesteps: int, cfg) -> jnp.ndarray:
    """AR-Diffusion's FoPP: non-decreasing along the frames (`fopp_timesteps`)."""
    del cfg
    return fopp_timesteps(rng, batch_size, num_frames, num_timesteps)


def ptss_fopp_scheme(rng, batch_size: int, num_frames: int, num_timesteps: int, cfg) -> jnp.ndarray:
    """PTSS whose per-frame branch is FoPP: with probability p non-decreasing, else shared."""
    p, mode, groups = _coin(cfg)
    return ptss_timesteps(rng, batch_size, num_frames, num_timesteps, p, mode, groups,
                          per_frame=fopp_timesteps)


SCHEMES: Mapping[str, Scheme] = {
    "ptss": ptss_scheme,
    "independent": independent_scheme,
    "fopp": fopp_scheme,
    "ptss_fopp": ptss_fopp_scheme,
}
COIN_SCHEMES = ("ptss", "ptss_fopp")  # the schemes that read ptss.p and ptss.mode


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"ptss.scheme={name!r} is not one of {tuple(SCHEMES)}")
    return SCHEMES[name]


def check_scheme_config(ptss: Mapping[str, Any]) -> None:
    """ValueError naming the bad key of the ptss section (scheme, mode or p)."""
    get_scheme(ptss.get("scheme", "ptss"))
    check_coin(float(ptss["p"]), ptss["mode"])


def draw_frame_timesteps(rng: jax.Array, batch_size: int, num_frames: int, num_timesteps: int,
                         ptss: Mapping[str, Any], coin_groups: int = 1) -> jnp.ndarray:
    """The training timesteps of `ptss.scheme` (default 'ptss'): int32 (B, F); jit-safe.
    coin_groups: the number of data shards of the batch (read by ptss.mode=per_device)."""
    cfg = {"p": ptss["p"], "mode": ptss.get("mode", "per_batch"), "coin_groups": int(coin_groups)}
    tau = get_scheme(ptss.get("scheme", "ptss"))(rng, batch_size, num_frames, num_timesteps, cfg)
    return tau.astype(jnp.int32)
