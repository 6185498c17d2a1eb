"""The sharded train step and loop on 8 simulated CPU devices: mesh equivalence, gradient
accumulation, exact resume, restore onto another mesh, preemption, non-finite stops, config errors,
and the XL recipe's sharded state built abstractly."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from fvdm_jax import sharding as shd
from fvdm_jax.checkpoint import TrainCheckpointer, load_inference_checkpoint
from fvdm_jax.config_utils import load_config
from fvdm_jax.train import NonFiniteError, build_setup, export, train

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
STEPS = 5


def tiny_config(**overrides):
    config = load_config(os.path.join(CONFIGS, "tiny.py"))
    config.train.num_steps = STEPS
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 100
    config.checkpoint.async_save = False
    for path, value in overrides.items():
        section, key = path.split(".")
        config[section][key] = value
    return config


def read_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def leaves(tree):
    return [np.asarray(jax.device_get(x)) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """5 steps, pure data parallelism over all 8 devices."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = train(tiny_config(), workdir)
    return result, read_losses(workdir)


def test_reference_run_learns_and_compiles_once(reference_run):
    result, losses = reference_run
    assert result.step == STEPS and not result.preempted
    assert result.compilations == 1
    assert len(losses) == STEPS and all(np.isfinite(losses))


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_meshes_give_the_same_training(reference_run, tmp_path, mesh_shape):
    ref_result, ref_losses = reference_run
    result = train(tiny_config(**{"mesh.shape": mesh_shape}), str(tmp_path))
    np.testing.assert_allclose(read_losses(str(tmp_path)), ref_losses, rtol=1e-5)
    for p, q in zip(leaves(result.state.params), leaves(ref_result.state.params)):
        assert np.max(np.abs(p - q) - (1e-6 + 1e-5 * np.abs(q))) <= 0


def test_gradient_accumulation_matches_one_big_batch(reference_run, tmp_path):
    ref_result, ref_losses = reference_run
    # Micro-batches of 4 over a 4-device data axis.
    config = tiny_config(**{"train.grad_accum_steps": 2})
    result = train(config, str(tmp_path), devices=jax.devices()[:4])
    np.testing.assert_allclose(read_losses(str(tmp_path)), ref_losses, rtol=1e-5)
    for p, q in zip(leaves(result.state.params), leaves(ref_result.state.params)):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_with_float32_master_weights(tmp_path):
    config = tiny_config(**{"model.dtype": "bfloat16", "train.num_steps": 2})
    result = train(config, str(tmp_path))
    params = jax.tree_util.tree_leaves(result.state.params)
    assert all(p.dtype == np.float32 for p in params)
    assert all(np.isfinite(read_losses(str(tmp_path))))


def test_killed_and_restarted_run_equals_uninterrupted_run(reference_run, tmp_path):
    ref_result, ref_losses = reference_run
    workdir = str(tmp_path)
    first = train(tiny_config(**{"train.num_steps": 2}), workdir)
    assert first.step == 2
    resumed = train(tiny_config(), workdir)
    assert resumed.step == STEPS
    # Bit for bit: params, EMA, optimizer state, step and the data position.
    for a, b in zip(leaves(resumed.state), leaves(ref_result.state)):
        np.testing.assert_array_equal(a, b)
    assert read_losses(workdir) == ref_losses


def test_restore_onto_another_mesh(reference_run, tmp_path_factory):
    ref_result, _ = reference_run
    workdir = str(tmp_path_factory.mktemp("remesh"))
    train(tiny_config(**{"train.num_steps": 3}), workdir)  # saved from an 8-device mesh
    config = tiny_config(**{"mesh.shape": (1, 2, 2)})
    devices = jax.devices()[:4]
    setup = build_setup(config, devices)
    ckpt = TrainCheckpointer(workdir, config.checkpoint)
    state = ckpt.restore_state(3, setup.abstract_state)
    ckpt.close()
    qkv = state.params["params"]["blocks"]["spatial"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == shd.spec_for(qkv.shape, ("layers", "embed", "qkv", "heads", "kv"), setup.mesh, setup.rules)
    assert len(qkv.sharding.device_set) == 4
    # Continue on 4 devices: the data restarts at step 3 and training matches the 8-device run.
    result = train(config, workdir, devices=devices)
    for p, q in zip(leaves(result.state.params), leaves(ref_result.state.params)):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)


def test_sigterm_saves_the_current_step_and_stops(tmp_path):
    def hook(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(tiny_config(), str(tmp_path), step_hook=hook)
    assert result.preempted and result.step == 2
    ckpt = TrainCheckpointer(str(tmp_path), tiny_config().checkpoint)
    assert ckpt.latest_step() == 2
    ckpt.close()
    # The handler is uninstalled afterwards.
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler, None) or callable(
        signal.getsignal(signal.SIGTERM)
    )


def test_non_finite_loss_stops_before_checkpointing(tmp_path):
    config = tiny_config(**{"train.lr": float("nan"), "checkpoint.every_steps": 1})
    with pytest.raises(NonFiniteError, match="at step 0"):
        train(config, str(tmp_path))
    ckpt = TrainCheckpointer(str(tmp_path), config.checkpoint)
    assert ckpt.latest_step() is None
    ckpt.close()


def test_export_writes_ema_inference_checkpoint(reference_run, tmp_path):
    workdir = str(tmp_path)
    config = tiny_config(**{"train.num_steps": 1})
    train(config, workdir)
    out = export(config, workdir)
    params, saved = load_inference_checkpoint(out)
    assert saved["model"]["hidden_size"] == 32
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.device_get(reference_run[0].state.ema_params)
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"train.batch_size": 12}, "divisible by the data x fsdp mesh size 8"),
        ({"mesh.shape": (3, -1, 1)}, "not divisible by 3"),
        ({"ptss.mode": "per_frame"}, "ptss.mode"),
        ({"train.schedule": "linear"}, "train.schedule"),
        ({"model.attention": "flash"}, "model.attention"),
    ],
)
def test_bad_config_values_fail_at_once(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train(tiny_config(**overrides), str(tmp_path))


def test_unknown_config_keys_fail_at_once(tmp_path):
    config = tiny_config()
    config.train.unlock()
    config.train.learning_rate = 1.0
    with pytest.raises(ValueError, match="unknown train config keys .'learning_rate'."):
        train(config, str(tmp_path))


def test_ffs_xl_recipe_builds_sharded_state_abstractly():
    from fvdm_jax.flops import model_flops_from_config

    config = load_config(os.path.join(CONFIGS, "ffs_xl.py"))
    config.mesh.shape = (1, 4, 2)  # FSDP x tensor parallel on 8 devices, global batch 4
    setup = build_setup(config)
    params = setup.abstract_state.params["params"]
    count = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
    assert count == 673_681_568
    mlp = params["blocks"]["temporal"]["mlp"]["fc1"]["kernel"]  # (layers, D, 4D)
    assert mlp.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    per_device = mlp.sharding.shard_shape(mlp.shape)
    assert per_device == (14, 1152 // 4, 4608 // 2)
    flops_per_step = 3 * model_flops_from_config(config.model) * config.train.batch_size
    assert flops_per_step == pytest.approx(4 * 11.2e12, rel=0.01)
    config.train.batch_size = 6
    with pytest.raises(ValueError, match="train.batch_size=6"):
        build_setup(config)


def test_demo_config_trains_on_the_shipped_clips(tmp_path):
    config = load_config(os.path.join(CONFIGS, "demo.py"))
    config.train.num_steps = 2
    config.train.batch_size = 8  # one video per simulated device
    config.checkpoint.async_save = False
    result = train(config, str(tmp_path))
    assert result.step == 2 and all(np.isfinite(read_losses(str(tmp_path))))
