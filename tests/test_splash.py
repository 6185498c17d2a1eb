"""TPU's splash attention kernel (fvdm_jax/models/splash.py), checked on CPU through the Pallas
interpreter: equal to XLA's attention, values and gradients, with sequence padding and masked
keys; the Wan model with it equals the Wan model with XLA's attention, on one device and sharded
over a mesh (shard_map); and compiled for a TPU slice, it keeps the (S, S) scores out of memory
where XLA's attention does not."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.config.load import load_config
from fvdm_jax.models import layers
from fvdm_jax.models.splash import splash_attention
from fvdm_jax.models.wan import wan_from_config, wan_model_config
from fvdm_jax.runtime import sharding as shd


def _qkv(n, s, length, heads, dh, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, s, heads, dh)).astype(np.float32)
    k, v = (rng.standard_normal((n, length, heads, dh)).astype(np.float32) for _ in range(2))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("s, length, masked", [(200, 200, False), (130, 40, True)])
def test_splash_equals_xla_values_and_gradients(s, length, masked):
    q, k, v = _qkv(2, s, length, 2, 128)
    mask = None
    if masked:  # the second example attends to its first 25 keys only
        mask = jnp.asarray(np.arange(length)[None, :] < np.asarray([[length], [25]]))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    splash = lambda q, k, v: splash_attention(q, k, v, mask, block=128, interpret=True)  # noqa: E731
    xla = lambda q, k, v: layers.dot_product_attention(q, k, v, "xla", key_mask=mask)  # noqa: E731
    np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), atol=2e-5)
    got = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_auto_picks_splash_on_tpu_for_long_sequences_only():
    resolve = layers.resolve_attention
    assert resolve("auto", jnp.bfloat16, "tpu", tokens=32760) == "splash"
    assert resolve("auto", jnp.bfloat16, "tpu", tokens=256) == "xla"
    assert resolve("auto", jnp.bfloat16, "tpu") == "xla"  # the DiT: length not given
    assert resolve("auto", jnp.bfloat16, "gpu", tokens=32760) == "cudnn"
    assert resolve("auto", jnp.float32, "cpu", tokens=32760) == "xla"


def _wan(attention):
    # head_dim 128: the kernel's lane width.
    config = wan_model_config("tiny", dim=256, num_heads=2, attention=attention)
    return wan_from_config(config)


def _inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 6, 8, 4)).astype(np.float32)  # 3 x 3 x 4 = 36 tokens
    t = rng.uniform(0, 1000, (4, 3)).astype(np.float32)
    context = rng.standard_normal((4, 5, 16)).astype(np.float32)
    mask = np.arange(5)[None, :] < np.asarray([[5], [3], [1], [4]])
    return x, t, context, mask


def test_wan_with_splash_equals_wan_with_xla():
    x, t, context, mask = _inputs()
    xla = _wan("xla")
    params = xla.init(jax.random.key(0), x, t, context, mask)
    want = xla.apply(params, x, t, context, mask)
    got = _wan("splash_interpret").apply(params, x, t, context, mask)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_wan_with_splash_sharded_over_a_mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    x, t, context, mask = _inputs()
    xla = _wan("xla")
    params = xla.init(jax.random.key(0), x, t, context, mask)
    want = xla.apply(params, x, t, context, mask)
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "wan_tiny.py"))
    config.mesh.shape = (2, 2, 2)
    mesh = shd.make_mesh(config.mesh)
    rules = shd.rules_from_config(config.mesh)
    splash = _wan("splash_interpret")
    with shd.activation_context(mesh, rules):
        got = jax.jit(splash.apply)(params, x, t, context, mask)
        program = str(jax.make_jaxpr(splash.apply)(params, x, t, context, mask))
    assert "shard_map" in program  # the kernel ran per shard
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_compiled_for_tpu_splash_does_not_hold_the_scores():
    pytest.importorskip("libtpu", reason="compiling for a TPU needs libtpu")
    from jax.experimental import topologies

    device = topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    shape = jax.ShapeDtypeStruct((1, 16384, 4, 128), jnp.bfloat16, sharding=sharding)

    def temps(implementation):
        def loss(q, k, v):
            out = layers.dot_product_attention(q, k, v, implementation)
            return jnp.sum(out.astype(jnp.float32))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = 4 * 16384 * 16384 * 2  # one (S, S) bf16 score matrix per head
    assert temps("xla") > scores
    assert temps("splash") < scores / 8

