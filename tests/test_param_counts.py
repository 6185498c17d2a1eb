"""Exact parameter counts of the named sizes, from abstract shapes (nothing is allocated)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.models.dit import MODEL_SIZES, DiT

# Unconditional, 16 frames, 32x32x4 latents, patch 2, learned sigma. "with_tables" includes the
# frozen spatial (256 x D) and temporal (16 x D) sin-cos tables: the paper's 32.59M ... 674.00M.
EXPECTED = {
    "S": (32_480_672, 32_585_120),
    "B": (129_547_040, 129_755_936),
    "L": (456_815_648, 457_094_176),
    "XL": (673_681_568, 673_994_912),
}
PAPER_MILLIONS = {"S": 32.59, "B": 129.76, "L": 457.09, "XL": 674.00}


def count_params(model: DiT, with_labels=False) -> int:
    x = jax.ShapeDtypeStruct((1, model.num_frames, model.input_size, model.input_size, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1, model.num_frames), jnp.int32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if with_labels else None
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, y))
    return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes)))


@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_named_size_counts(size):
    hidden, depth, heads = MODEL_SIZES[size]
    model = DiT(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=2)
    trainable, with_tables = EXPECTED[size]
    assert count_params(model) == trainable
    assert count_params(model) + model.frozen_table_size() == with_tables
    assert abs(with_tables / 1e6 - PAPER_MILLIONS[size]) < 0.0055  # the paper's 2-decimal figure


def test_class_conditional_adds_label_table():
    hidden, depth, heads = MODEL_SIZES["S"]
    uncond = DiT(hidden_size=hidden, depth=depth, num_heads=heads)
    cond = DiT(hidden_size=hidden, depth=depth, num_heads=heads, num_classes=101)
    # 101 classes + the null class for guidance.
    assert count_params(cond, with_labels=True) - count_params(uncond) == 102 * hidden
