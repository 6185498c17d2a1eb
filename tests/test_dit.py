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


@pytest.mark.parametrize("policy", ["full", "dots", "auto"])
def test_remat_changes_nothing_numerically(tiny, policy):
    _, params, x, t = tiny
    model = DiT(**TINY, remat="none")
    remat = DiT(**TINY, remat=policy)

    def loss(m, p):
        return jnp.mean(m.apply(p, x, t) ** 2)

    g_ref = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    g = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_remat_is_dots_on_cpu_and_none_on_accelerators():
    from fvdm_jax.models.dit import resolve_remat

    assert resolve_remat("auto", "cpu") == "dots"
    assert resolve_remat("auto", "gpu") == resolve_remat("auto", "tpu") == "none"
    assert resolve_remat("full", "gpu") == "full"  # an explicit choice is kept everywhere
    # The resolved policy is what runs: the CPU backward recomputes (remat'd jaxpr) under auto.
    model = DiT(**TINY)
    x = jnp.zeros((1, TINY["num_frames"], TINY["input_size"], TINY["input_size"],
                   TINY["in_channels"]))
    t = jnp.zeros((1, TINY["num_frames"]), jnp.int32)
    params = model.init(jax.random.key(0), x, t)
    text = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply(p, x, t))))(params))
    assert "remat" in text or "checkpoint" in text


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


def test_each_frame_is_modulated_by_its_own_timestep_only():
    """Frame i's output sees tau_i only through frame i's adaLN modulation, in every block and in
    the final layer; other frames' timesteps reach it only through temporal attention.

    With the temporal blocks' attention output zeroed, frames cannot exchange anything, so frame i
    of the model at per-frame tau must equal frame i of the same model with every frame at tau_i
    (the scalar-timestep Latte model). A modulation taken from another frame, from a pooled
    timestep or broadcast over the wrong axis fails this. Here a frame has as many tokens as the
    video has frames (2x2 patches, 4 frames), so a wrong-axis broadcast raises no shape error."""
    config = dict(TINY, input_size=4)
    model = DiT(**config)
    assert model.tokens_per_frame == model.num_frames
    x = jax.random.normal(jax.random.key(4), (2, 4, 4, 4, 4))
    tau = jnp.array([[0, 250, 999, 40], [600, 600, 3, 999]])
    params = randomize(nn.unbox(init(model, x, tau)), seed=5)
    proj = params["params"]["blocks"]["temporal"]["attn"]["proj"]
    cut = jax.tree_util.tree_map(lambda a: a, params)
    cut["params"]["blocks"]["temporal"]["attn"]["proj"] = jax.tree_util.tree_map(np.zeros_like, proj)

    out = apply(model, cut, x, tau)
    for i in range(4):
        alike = apply(model, cut, x, jnp.broadcast_to(tau[:, i : i + 1], tau.shape))
        np.testing.assert_allclose(out[:, i], alike[:, i], atol=1e-6, err_msg=f"frame {i}")
    # Moving one frame's timestep moves that frame (the test is not vacuous) and, through temporal
    # attention only, the others: cut, they stay put; intact, they move.
    moved_tau = tau.at[:, 2].set(500)
    moved = apply(model, cut, x, moved_tau)
    assert np.abs(moved[:, 2] - out[:, 2]).max() > 1e-2
    np.testing.assert_allclose(np.delete(moved, 2, axis=1), np.delete(out, 2, axis=1), atol=1e-6)
    full, full_moved = apply(model, params, x, tau), apply(model, params, x, moved_tau)
    assert np.abs(np.delete(full_moved - full, 2, axis=1)).max(axis=(0, 2, 3, 4)).min() > 1e-3


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


def test_dtype_asserts_name_the_input_and_the_fix():
    """uint8 frames or float labels fail while tracing (static dtypes), with chex's message."""
    x, t, y = jnp.zeros((2, 4, 8, 8, 4)), jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32)
    conditional = DiT(**TINY, num_classes=3)
    with pytest.raises(AssertionError, match=r"uint8 but expected.*value / 127\.5 - 1"):
        jax.eval_shape(conditional.init, jax.random.key(0), x.astype(jnp.uint8), t, y)
    with pytest.raises(AssertionError, match=r"float32 but expected.*\[0, 3\] \(3: the null class\)"):
        jax.eval_shape(conditional.init, jax.random.key(0), x, t, y.astype(jnp.float32))
    for dtype in (jnp.float32, jnp.bfloat16):  # any float x, int or float timesteps pass
        jax.eval_shape(conditional.init, jax.random.key(0), x.astype(dtype), t.astype(jnp.int32), y)


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
    from fvdm_jax.config.schema import validate_section
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
