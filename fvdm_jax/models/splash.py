"""Attention with TPU's Pallas splash kernel (jax.experimental.pallas.ops.tpu.splash_attention).

XLA's attention writes the (S, S) scores of every head to memory; at Wan's 21 x 60 x 104 latents
(32,760 tokens) that is 4 GiB per head in float32, so the 480p recipes cannot train or sample on
a TPU without a fused kernel. Splash computes softmax(q k^T / sqrt(d)) v block by block (online
softmax), forward and backward, never holding the scores.

`splash_attention(q, k, v, key_mask)` takes the (N, S, H, Dh) layout of the models. Sequence
lengths are padded to whole blocks; the padding (and the keys a `key_mask` masks out) get another
segment id than the real tokens, so no real query attends to them. Inside a mesh (jax.set_mesh
and flax's logical rules, as the train step and the samplers trace their models) the kernel runs
per shard under `jax.shard_map`: the batch split as the rules split 'batch', the heads as they
split 'heads' (a sequence split is gathered first). `interpret=True` runs the same kernel through
the Pallas interpreter on any backend (how the tests check it on CPU; slow).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

BLOCK = 512  # tokens per kernel block (q and kv); shorter sequences use one block
LANE = 128  # TPU lane width: every block is a multiple of it
REAL, PADDING = 0, 1  # segment ids: real tokens attend only to real tokens
# Logical names of q, k, v (N, S, H, Dh) and of the segment ids (N, S) under shard_map.
QKV_AXES = ("batch", None, "heads", None)
SEGMENT_AXES = ("batch", None)


def _block(length: int, block: int) -> int:
    return min(block, LANE * math.ceil(length / LANE))


def _pad(x, length: int):
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _kernel(heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, interpret: bool):
    """The kernel for one shard's shapes, built at every trace (a kernel kept from one trace
    to another carries that trace's arrays)."""
    mask = masks.MultiHeadMask([masks.FullMask((q_len, kv_len)) for _ in range(heads)])
    sizes = kernels.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv)
    return kernels.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                   interpret=interpret)


def _local(q, k, v, q_segments, kv_segments, *, block: int, interpret: bool):
    """One shard: (n, S, h, Dh) arrays, segment ids (n, S) / (n, L), already padded."""
    heads, q_len, kv_len = q.shape[2], q.shape[1], k.shape[1]
    kernel = _kernel(heads, q_len, kv_len, _block(q_len, block), _block(kv_len, block),
                     interpret)

    def one(q, k, v, q_seg, kv_seg):  # (S, h, Dh) -> the kernel's (h, S, Dh)
        out = kernel(q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2),
                     segment_ids=kernels.SegmentIds(q=q_seg, kv=kv_seg))
        return out.transpose(1, 0, 2)

    return jax.vmap(one)(q, k, v, q_segments, kv_segments)


def splash_attention(q, k, v, key_mask=None, *, block: int = BLOCK, interpret: bool = False):
    """softmax(q k^T / sqrt(Dh)) v of q (N, S, H, Dh) and k, v (N, L, H, Dh); key_mask (N, L)
    bool (True = attended; every query needs one attended key). Returns (N, S, H, Dh)."""
    n, s, _, dh = q.shape
    length = k.shape[1]
    block_q, block_kv = _block(s, block), _block(length, block)
    s_pad = block_q * math.ceil(s / block_q)
    l_pad = block_kv * math.ceil(length / block_kv)
    q_segments = jnp.where(jnp.arange(s_pad) < s, REAL, PADDING).astype(jnp.int32)
    q_segments = jnp.broadcast_to(q_segments, (n, s_pad))
    real = jnp.arange(l_pad)[None, :] < length
    if key_mask is not None:
        real = real & _pad(key_mask.astype(bool), l_pad)
    kv_segments = jnp.where(real, REAL, PADDING).astype(jnp.int32)
    kv_segments = jnp.broadcast_to(kv_segments, (n, l_pad))
    scale = np.asarray(1.0 / math.sqrt(dh), q.dtype)
    args = (_pad(q * scale, s_pad), _pad(k, l_pad), _pad(v, l_pad), q_segments, kv_segments)
    local = functools.partial(_local, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = local(*args)
    else:
        qkv = nn.logical_to_mesh_axes(QKV_AXES)
        segments = nn.logical_to_mesh_axes(SEGMENT_AXES)
        out = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, segments, segments),
                            out_specs=qkv, check_vma=False)(*args)
    return out[:, :s]
