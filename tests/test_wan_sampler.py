"""fvdm_jax/sampling/wan_sampler.py on a tiny random Wan and a 2-device mesh: Pusa's conditioning
(given frames at sigma * m, exact at m = 0), the scan against a plain python Euler loop over
levels written out here (Wan's grid), text guidance, batch padding, one compile per shape, and
one-line errors."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.config.load import load_config
from fvdm_jax.diffusion.flow import FlowSchedule
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.wan import wan_from_config, wan_model_config
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.sampling.wan_sampler import WanSampler

RULES = shd.rules_from_config(
    load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")).mesh)
F, HW, C, STEPS, SHIFT = 3, (4, 4), 4, 3, 5.0
CONFIG = wan_model_config("tiny")


@pytest.fixture(scope="module")
def mesh():
    """Batch split 2 (data=2)."""
    return shd.make_mesh({"shape": (2, 1, 1), "axes": ("data", "fsdp", "tensor")}, jax.devices()[:2])


@pytest.fixture(scope="module")
def params():
    """Random weights; the head is zero at init, so every leaf gets noise (v depends on x, t and
    the text)."""
    model = wan_from_config(CONFIG)

    @jax.jit
    def init(key):
        variables = nn.unbox(model.init(key, jnp.zeros((1, 1, 2, 2, C)), jnp.zeros((1,)),
                                        jnp.zeros((1, 1, CONFIG["text_dim"]))))
        leaves, tree = jax.tree_util.tree_flatten(variables)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return jax.tree_util.tree_unflatten(
            tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    return init(jax.random.key(0))


def sampler(mesh, params, **kw):
    kw = dict(num_steps=STEPS, cfg_scale=1.0, num_frames=F, latent_hw=HW) | kw
    return WanSampler(CONFIG, FlowSchedule(1000, SHIFT), mesh=mesh, rules=RULES, params=params, **kw)


def normal(seed, shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


def wan_levels(frames, m):
    """Wan 2.1's grid written out (shift(linspace(1, 0, S + 1)[:S]), then 0), given frames at
    sigma * m: (S + 1, B, F)."""
    s = np.linspace(1, 0, STEPS + 1)[:STEPS]
    grid = np.append(SHIFT * s / (1 + (SHIFT - 1) * s), 0.0).astype(np.float32)
    levels = np.broadcast_to(grid[:, None, None], (STEPS + 1,) + frames.shape)
    return np.where(frames[None], levels * np.float32(m), levels)


def reference(params, noise, clean, frames, m, context, null=None, scale=1.0):
    """A plain python loop of Euler steps (no scan), guidance as two separate model calls."""
    apply = jax.jit(wan_from_config(CONFIG).apply)
    levels = wan_levels(frames, m)
    s0 = levels[0][:, :, None, None, None]
    x = np.where(frames[:, :, None, None, None], (1 - s0) * clean + s0 * noise, noise)
    for sigma, sigma_next in zip(levels[:-1], levels[1:]):
        v = np.asarray(apply(params, x, sigma * 1000.0, context))
        if null is not None:
            v_null = np.asarray(apply(params, x, sigma * 1000.0, null))
            v = v_null + scale * (v - v_null)
        x = x + (sigma_next - sigma)[:, :, None, None, None] * v
    return x


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


CONTEXT = normal(5, (2, 6, CONFIG["text_dim"]))


@pytest.mark.parametrize("m", [0.0, 0.3])
def test_i2v_frame_zero_is_exact_at_m_zero_and_close_at_m_positive(mesh, params, m):
    image, noise = normal(2, (2, 1, *HW, C)), normal(3, (2, F, *HW, C))
    out = sampler(mesh, params, noise_multiplier=m).run(
        "i2v", jax.random.key(0), context=CONTEXT, model_inputs=image, noise=noise)
    assert out.shape == (2, F, *HW, C) and out.dtype == np.float32
    assert np.array_equal(out[:, 0], image[:, 0]) == (m == 0.0)
    error = np.sqrt(np.mean((out[:, 0] - image[:, 0]) ** 2))
    assert error < 0.5 * np.sqrt(np.mean((noise[:, 0] - image[:, 0]) ** 2))
    assert not np.allclose(out[:, 1:], noise[:, 1:], atol=1e-2)


@pytest.mark.parametrize("task,indices,given", [
    ("interpolate", None, [0, F - 1]),
    ("interpolate", [2, 0], [2, 0]),
    ("any_frame", [1], [1]),
    ("extend", None, [0, 1]),
])
def test_given_frames_stay_exact_at_m_zero(mesh, params, task, indices, given):
    inputs = normal(4, (2, len(given), *HW, C))
    out = sampler(mesh, params).run(task, jax.random.key(1), context=CONTEXT, model_inputs=inputs,
                                    frame_indices=indices)
    assert np.array_equal(out[:, given], inputs)
    free = [i for i in range(F) if i not in given]
    assert free and np.isfinite(out[:, free]).all()


@pytest.mark.parametrize("task,m", [("generate", 0.0), ("i2v", 0.3), ("extend", 0.0)])
def test_scan_equals_a_python_euler_loop(mesh, params, task, m):
    noise = normal(6, (2, F, *HW, C))
    k = {"generate": 0, "i2v": 1, "extend": 2}[task]
    inputs = normal(7, (2, k, *HW, C)) if k else None
    out = sampler(mesh, params, noise_multiplier=m).run(
        task, jax.random.key(2), context=CONTEXT, model_inputs=inputs, noise=noise)
    clean, frames = np.zeros_like(noise), np.zeros((2, F), bool)
    clean[:, :k], frames[:, :k] = (inputs if k else 0), True
    close(out, reference(params, noise, clean, frames, m, CONTEXT))


def test_text_guidance(mesh, params):
    noise, image = normal(8, (2, F, *HW, C)), normal(9, (2, 1, *HW, C))
    null = normal(10, (1, 4, CONFIG["text_dim"]))  # one negative prompt, shorter: zero-padded
    kw = dict(context=CONTEXT, model_inputs=image, noise=noise)
    unguided = sampler(mesh, params).run("i2v", jax.random.key(3), **kw)
    # Scale 1: the null context is not used.
    close(sampler(mesh, params).run("i2v", jax.random.key(3), null_context=null, **kw), unguided)
    out = sampler(mesh, params, cfg_scale=4.0).run("i2v", jax.random.key(3), null_context=null, **kw)
    clean, frames = np.zeros_like(noise), np.zeros((2, F), bool)
    clean[:, :1], frames[:, 0] = image, True
    padded = np.broadcast_to(np.pad(null, ((0, 0), (0, 2), (0, 0))), CONTEXT.shape)
    close(out, reference(params, noise, clean, frames, 0.0, CONTEXT, padded, 4.0))
    assert np.array_equal(out[:, 0], image[:, 0]) and not np.allclose(out, unguided, atol=1e-3)


def test_padding_does_not_leak_and_one_compile_per_shape(mesh, params):
    s = sampler(mesh, params)
    context, noise = normal(11, (3, 6, CONFIG["text_dim"])), normal(12, (3, F, *HW, C))
    out = s.run("generate", jax.random.key(4), context=context, noise=noise)
    assert out.shape == (3, F, *HW, C) and s.padded(3) == 4 and s.compilations() == 1
    again = s.run("generate", jax.random.key(4), context=context, noise=noise)
    assert s.compilations() == 1 and np.array_equal(out, again)
    for i in range(3):
        alone = s.run("generate", jax.random.key(4), context=context[i:i + 1], noise=noise[i:i + 1])
        close(out[i:i + 1], alone)
    # Without explicit noise, video i's noise comes from fold_in(rng, i): batch-independent.
    drawn = s.run("generate", jax.random.key(4), context=context)
    close(drawn[:1], s.run("generate", jax.random.key(4), context=context[:1]))
    assert s.compilations() == 2  # padded batches 4 and 2


def test_lower_gives_the_program_on_abstract_inputs(mesh):
    s = sampler(mesh, None, cfg_scale=2.0)
    lowered = s.lower("i2v", batch=3, context_len=7)
    assert lowered.out_info.shape == (4, F, *HW, C)
    assert s.compilations() == 0


@pytest.mark.parametrize("change,match", [
    (dict(context=np.zeros((2, 6, 8))), "text_dim = 16"),
    (dict(model_inputs=np.zeros((2, 1, *HW, 3))), r"\(B, K, h, w, C\)"),
    (dict(model_inputs=np.zeros((2, 1, 2, 4, C))), r"\(B, K, h, w, C\)"),
    (dict(task="any_frame", model_inputs=np.zeros((2, 2, *HW, C)), frame_indices=[0, F]),
     "outside"),
    (dict(task="any_frame", model_inputs=np.zeros((2, 2, *HW, C)), frame_indices=[1, 1]),
     "duplicates"),
    (dict(task="any_frame", model_inputs=np.zeros((2, 2, *HW, C)), frame_indices=[1]),
     "K = 2 frames but 1"),
    (dict(task="any_frame", model_inputs=np.zeros((2, 1, *HW, C))), "needs frame_indices"),
    (dict(task="interpolate", model_inputs=np.zeros((2, 3, *HW, C))), "needs frame_indices"),
    (dict(task="extend", model_inputs=np.zeros((2, F, *HW, C))), "must lie in"),
    (dict(task="i2v", model_inputs=None), "needs model_inputs"),
    (dict(task="generate", model_inputs=np.zeros((2, 1, *HW, C))), "takes no"),
    (dict(task="t2i"), "unknown task"),
])
def test_bad_inputs_are_one_line_errors(mesh, change, match):
    s = sampler(mesh, None)
    kw = dict(task="i2v", context=CONTEXT, model_inputs=np.zeros((2, 1, *HW, C))) | change
    with pytest.raises(ConfigError, match=match) as error:
        s.run(kw.pop("task"), jax.random.key(0), **kw)
    assert "\n" not in str(error.value)


def test_bad_settings_are_one_line_errors(mesh):
    for m in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"must lie in \[0, 1\]") as error:
            sampler(mesh, None, noise_multiplier=m)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="needs null_context") as error:
        sampler(mesh, None, cfg_scale=5.0).run("generate", jax.random.key(0), context=CONTEXT)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="unknown task"):
        sampler(mesh, None).lower("t2i")
