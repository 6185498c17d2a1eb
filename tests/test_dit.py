"""Behaviour of the video DiT beyond the official vectors: shapes, errors, scan/unroll, remat,
per-frame modulation, dtypes and the independence of frames' timesteps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.models.dit import DiT, drop_labels, model_from_config

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4, num_frames=4)


def init(model, *args):
    return jax.jit(model.init)(jax.random.key(0), *args)


def apply(model, params, *args):
    return jax.jit(model.apply)(params, *args)


def randomize(params, seed=0):
    """Replaces every parameter (zero-initialized adaLN/final layers too) by N(0, 0.2)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda leaf: (0.2 * rng.normal(size=leaf.shape)).astype(np.float32), params
    )


@pytest.fixture(scope="module")
def tiny():
    model = DiT(**TINY)
    x = jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 4))
    t = jnp.array([[0, 10, 500, 999], [3, 3, 3, 3]])
    params = randomize(nn.unbox(init(model, x, t)))
    return model, params, x, t


def test_output_shape_and_zero_init():
    model = DiT(**TINY)
    x = jnp.ones((3, 4, 8, 8, 4))
    t = jnp.zeros((3, 4), jnp.int32)
    params = init(model, x, t)
    out = apply(model, params, x, t)
    assert out.shape == (3, 4, 8, 8, 8) and out.dtype == jnp.float32
    # adaLN-Zero: the final layer starts at zero, so a fresh model predicts zeros.
    np.testing.assert_array_equal(out, 0.0)


def test_scan_and_unrolled_share_params_and_outputs(tiny):
    model, params, x, t = tiny
    unrolled = DiT(**TINY, scan_layers=False)
    shapes = nn.unbox(jax.eval_shape(unrolled.init, jax.random.key(0), x, t))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(apply(unrolled, params, x, t), apply(model, params, x, t), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_nothing_numerically(tiny, policy):
    model, params, x, t = tiny
    remat = DiT(**TINY, remat=policy)

    def loss(m, p):
        return jnp.mean(m.apply(p, x, t) ** 2)

    g_ref = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    g = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_frame_timesteps_act_per_frame(tiny):
    """Changing one frame's timestep changes the prediction through that frame's conditioning,
    and a uniform (B, F) timestep equals the scalar-timestep model broadcast over frames."""
    model, params, x, t = tiny
    base = apply(model, params, x, t)
    t2 = t.at[0, 2].set(7)
    moved = apply(model, params, x, t2)
    assert not np.allclose(moved[0], base[0])
    np.testing.assert_allclose(moved[1], base[1], atol=1e-6)  # other videos untouched
    # Float timesteps are accepted and agree with ints on the grid.
    np.testing.assert_allclose(apply(model, params, x, t.astype(jnp.float32)), base, atol=1e-6)


def test_per_frame_modulation_equals_official_per_token_form(tiny):
    """The temporal block's adaLN computed once per frame equals the official per-token Dense."""
    model, params, x, t = tiny
    from fvdm_jax.models.layers import AdaLNModulation

    p = params["params"]["blocks"]["temporal"]["adaLN"]
    p0 = jax.tree_util.tree_map(lambda a: a[0], p)
    c = jax.random.normal(jax.random.key(3), (2, 4, 32))  # (B, F, D)
    mod = AdaLNModulation(32, 6)
    per_frame = mod.apply({"params": p0}, c[:, None])  # (B, 1, F, D), broadcast later
    tokens = 16
    per_token = mod.apply({"params": p0}, jnp.broadcast_to(c[:, None], (2, tokens, 4, 32)))
    for a, b in zip(per_frame, per_token):
        np.testing.assert_allclose(jnp.broadcast_to(a, b.shape), b, atol=1e-6)


def test_bfloat16_compute_runs_close_to_float32(tiny):
    model, params, x, t = tiny
    bf16 = DiT(**TINY, dtype=jnp.bfloat16)
    out = apply(bf16, params, x, t)
    ref = apply(model, params, x, t)
    assert out.dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert rel < 0.05, rel


def test_class_conditional_uses_labels_and_null_class():
    model = DiT(**TINY, num_classes=3)
    x = jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 4))
    t = jnp.full((2, 4), 100)
    params = randomize(nn.unbox(init(model, x, t, jnp.zeros(2, jnp.int32))))
    assert params["params"]["y_embedder"]["embedding"].shape == (4, 32)
    a = apply(model, params, x, t, jnp.array([0, 1]))
    b = apply(model, params, x, t, jnp.array([2, 3]))  # 3 = the null class
    assert not np.allclose(a, b)


def test_drop_labels_rate():
    labels = jnp.zeros((20000,), jnp.int32)
    dropped = drop_labels(jax.random.key(0), labels, 0.1, num_classes=101)
    frac = float(jnp.mean(dropped == 101))
    assert abs(frac - 0.1) < 5 * np.sqrt(0.1 * 0.9 / 20000)
    assert set(np.unique(dropped)) <= {0, 101}


@pytest.mark.parametrize(
    "shape_x, shape_t, match",
    [
        ((2, 5, 8, 8, 4), (2, 5), "model.num_frames"),
        ((2, 4, 16, 16, 4), (2, 4), "model.input_size"),
        ((2, 4, 8, 8, 3), (2, 4), "model.in_channels"),
        ((2, 4, 8, 8, 4), (2,), "one timestep per frame"),
    ],
)
def test_clear_errors_for_bad_shapes(shape_x, shape_t, match):
    model = DiT(**TINY)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape_x), jnp.zeros(shape_t))


def test_clear_errors_for_labels_and_architecture():
    x, t = jnp.zeros((2, 4, 8, 8, 4)), jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="class-conditional"):
        jax.eval_shape(DiT(**TINY, num_classes=3).init, jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(DiT(**TINY).init, jax.random.key(0), x, t, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="divisible by model.num_heads"):
        jax.eval_shape(DiT(**{**TINY, "num_heads": 5}).init, jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="model.depth"):
        jax.eval_shape(DiT(**{**TINY, "depth": 3}).init, jax.random.key(0), x, t)


def test_model_from_config_sizes_and_errors():
    base = dict(size="S", patch_size=2, input_size=32, in_channels=4, num_frames=16)
    model = model_from_config(base)
    assert (model.hidden_size, model.depth, model.num_heads) == (384, 12, 6)
    custom = model_from_config({**base, "size": "custom", "hidden_size": 64, "depth": 2, "num_heads": 2})
    assert (custom.hidden_size, custom.depth, custom.num_heads) == (64, 2, 2)
    with pytest.raises(ValueError, match="contradicts model.size"):
        model_from_config({**base, "hidden_size": 64})
    with pytest.raises(ValueError, match="needs model.hidden_size"):
        model_from_config({**base, "size": "custom"})
    from fvdm_jax.config_schema import validate_section
    from fvdm_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="model.hiden_size.*hidden_size"):  # the schema's check
        validate_section("model", {**base, "hiden_size": 64}, allow_missing=True)
    with pytest.raises(ValueError, match="model.dtype"):
        model_from_config({**base, "dtype": "float8"})


def test_default_config_builds_xl():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
    spec = importlib.util.spec_from_file_location("default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    model = model_from_config(config.model)
    assert (model.hidden_size, model.depth, model.num_heads, model.patch_size) == (1152, 28, 16, 2)
