"""Wan 2.1 training with rectified flow and per-frame levels on 8 simulated CPU devices: the loss
falls on a handful of text-latent clips, a killed-and-resumed run equals an uninterrupted one, one
jitted flow step's loss equals numpy's for its noise and indices (text dropout included), and a
Wan config refuses what stays DiT-only."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvdm_jax.config import checks
from fvdm_jax.config.load import load_config
from fvdm_jax.diffusion.flow import FlowSchedule
from fvdm_jax.diffusion.schemes import draw_frame_timesteps
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.build import flat_model_config, model_from_config
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.training.loop import create_state, train
from fvdm_jax.training.setup import build_setup
from fvdm_jax.training.step import JittedTrainStep

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
STEPS = 20
C, F, H, W, L, D = 4, 4, 4, 4, 5, 16


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """8 .npz clips: latents (C, F, h, w), contexts (L, D) with 2 to 5 real tokens."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    for i in range(8):
        context = np.zeros((L, D), np.float32)
        context[: 2 + i % 4] = rng.standard_normal((2 + i % 4, D))
        latents = 0.5 * rng.standard_normal((C, F, H, W)).astype(np.float32) + i / 8
        np.savez(root / f"clip{i}.npz", latents=latents, context=context)
    return str(root)


def wan_config(clip_dir, **overrides):
    config = load_config(os.path.join(CONFIGS, "wan_tiny.py"))
    config.data.source = "text_latents"
    config.data.path = clip_dir
    config.data.text_length = None
    config.train.num_steps = STEPS
    config.train.lr = 1e-2
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 100
    config.checkpoint.async_save = False
    for path, value in overrides.items():
        section, key = path.split(".")
        config[section][key] = value
    checks.check(config, "train")
    return config


def read_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def leaves(tree):
    return [np.asarray(jax.device_get(x)) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def reference_run(clip_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("wan_reference"))
    result = train(wan_config(clip_dir), workdir)
    return result, read_losses(workdir)


def test_wan_trains_and_the_loss_falls(reference_run):
    result, losses = reference_run
    assert result.step == STEPS and not result.preempted and result.compilations == 1
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_killed_and_restarted_wan_run_equals_uninterrupted_run(reference_run, clip_dir, tmp_path):
    ref_result, ref_losses = reference_run
    workdir = str(tmp_path)
    assert train(wan_config(clip_dir, **{"train.num_steps": 2}), workdir).step == 2
    resumed = train(wan_config(clip_dir), workdir)
    assert resumed.step == STEPS
    for a, b in zip(leaves(resumed.state), leaves(ref_result.state)):
        np.testing.assert_array_equal(a, b)
    assert read_losses(workdir) == ref_losses


def reference_sigmas(num_timesteps=1000, shift=5.0):
    """DiffSynth's training grid linspace(1, 0, T + 1)[:-1], shifted, in ascending order."""
    s = np.linspace(1.0, 0.0, num_timesteps + 1)[:-1]
    return (shift * s / (1 + (shift - 1) * s))[::-1]


@pytest.mark.parametrize("text_dropout", [0.0, 1.0])
def test_one_flow_step_loss_equals_numpy(clip_dir, text_dropout):
    config = wan_config(clip_dir, **{"ptss.scheme": "independent", "train.text_dropout_prob":
                                     text_dropout, "diffusion.shift": 3.0})
    setup = build_setup(config)
    assert isinstance(setup.schedule, FlowSchedule) and setup.schedule.shift == 3.0
    state = create_state(setup, 0)
    # Non-zero weights everywhere (Wan's head starts at zero, which would hide the input).
    params = jax.tree_util.tree_map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), state.params)
    state = state.replace(params=params)
    host_params = jax.device_get(params)  # the step donates the state
    rng = np.random.default_rng(3)
    mask = np.arange(L)[None] < np.array([2, 3, 4, 5, 1, 2, 3, 4])[:, None]
    batch = {"video": rng.standard_normal((8, F, H, W, C)).astype(np.float32),
             "label": np.zeros((8,), np.int32),
             "context": (rng.standard_normal((8, L, D)) * mask[..., None]).astype(np.float32),
             "context_mask": mask}
    host = {k: np.copy(v) for k, v in batch.items()}
    step = JittedTrainStep(setup.model, setup.schedule, setup.optimizer, config.train, config.ptss,
                           setup.state_shardings, setup.batch_shardings, rules=setup.rules)
    _, metrics = step(state, shd.global_batch(batch, setup.mesh, setup.rules))

    # What the step draws from fold_in(train.seed, step 0): indices, then noise.
    key_t, key_noise, _ = jax.random.split(jax.random.fold_in(jax.random.key(config.train.seed), 0), 3)
    index = np.asarray(draw_frame_timesteps(key_t, 8, F, 1000, config.ptss))
    noise = np.asarray(jax.random.normal(key_noise, (8, F, H, W, C), jnp.float32))
    assert len(np.unique(index)) > 8  # independent: every frame its own level
    sigma = reference_sigmas(shift=3.0)[index][:, :, None, None, None]
    x0 = host["video"]
    x_t = ((1 - sigma) * x0 + sigma * noise).astype(np.float32)
    context, ctx_mask = host["context"], host["context_mask"]
    if text_dropout:
        context, ctx_mask = np.zeros_like(context), np.ones_like(ctx_mask)
    model = model_from_config(config.model)
    v = np.asarray(model.apply(host_params, jnp.asarray(x_t),
                               jnp.asarray(sigma[:, :, 0, 0, 0] * 1000, jnp.float32),
                               jnp.asarray(context), jnp.asarray(ctx_mask)), np.float64)
    want = np.mean((v - (noise - x0)) ** 2)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["mse"]), want, rtol=2e-5)


def test_training_and_flat_wan_sections_build_the_same_model():
    config = load_config(os.path.join(CONFIGS, "wan_tiny.py"))
    flat = flat_model_config(config.model)
    assert flat["dim"] == 24 and flat["patch_size"] == (1, 2, 2) and "input_size" not in flat
    assert model_from_config(config.model) == model_from_config(flat)
    big = load_config(os.path.join(CONFIGS, "wan_14b.py"))
    assert model_from_config(big.model).dim == 5120
    big.model.wan.dim = 100
    with pytest.raises(ValueError, match="contradicts model.wan.size='14B'"):
        model_from_config(big.model)


@pytest.mark.parametrize("override, expect", [
    ({"diffusion.process": "vp"}, "Wan with rectified flow; set diffusion.process=flow"),
    ({"sample.every_steps": 10}, "sample.every_steps=10: periodic samples"),
    ({"eval.every_steps": 5}, "eval.every_steps=5"),
    ({"data.source": "demo"}, "set data.source to one of text_latents, synthetic"),
])
def test_a_wan_config_refuses_what_is_dit_only(override, expect):
    config = load_config(os.path.join(CONFIGS, "wan_tiny.py"))
    for path, value in override.items():
        section, key = path.split(".")
        config[section][key] = value
    with pytest.raises(ConfigError, match=expect) as error:
        checks.check(config, "train")
    assert "\n" not in str(error.value)


def test_a_dit_with_flow_is_refused():
    config = load_config(os.path.join(CONFIGS, "tiny.py"))
    config.diffusion.process = "flow"
    with pytest.raises(ConfigError, match="set model.architecture=wan"):
        checks.check(config, "train")
