"""The sharded train step and loop on 8 simulated CPU devices: mesh equivalence, gradient
accumulation, exact resume, restore onto another mesh, preemption, non-finite stops, config errors,
and the XL recipe's sharded state built abstractly."""

import json
import os
import re
import signal

import jax
import numpy as np
import pytest

from fvdm_jax.checkpoint.inference import load_inference_checkpoint
from fvdm_jax.checkpoint.manager import TrainCheckpointer
from fvdm_jax.config import checks
from fvdm_jax.config.load import load_config
from fvdm_jax.errors import ConfigError
from fvdm_jax.jobs.export import export
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.training.loop import NonFiniteError, train
from fvdm_jax.training.setup import build_setup

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


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), pytest.param((4, 2, 1), marks=pytest.mark.slow),
                                        (2, 2, 2)])
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
    names = ("layers", "embed", "qkv", "heads", "kv")
    assert qkv.sharding.spec == shd.spec_for(qkv.shape, names, setup.mesh, setup.rules)
    assert len(qkv.sharding.device_set) == 4
    # Continue on 4 devices: the data restarts at step 3 and training matches the 8-device run.
    result = train(config, workdir, devices=devices)
    for p, q in zip(leaves(result.state.params), leaves(ref_result.state.params)):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_current_step_and_stops(tmp_path, signum, code):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def hook(step):
        if step == 2:
            os.kill(os.getpid(), signum)

    result = train(tiny_config(), str(tmp_path), step_hook=hook)
    assert result.preempted and result.step == 2 and result.exit_code == code
    ckpt = TrainCheckpointer(str(tmp_path), tiny_config().checkpoint)
    assert ckpt.latest_step() == 2
    ckpt.close()
    # The handlers are uninstalled afterwards: the ones installed before are back.
    assert {s: signal.getsignal(s) for s in before} == before
    # A finished run says 0.
    assert train(tiny_config(), str(tmp_path / "other")).exit_code == 0


def test_a_second_ctrl_c_stops_without_saving(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, default_int_handler else

    def hook(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        train(tiny_config(), str(tmp_path), step_hook=hook)
    ckpt = TrainCheckpointer(str(tmp_path), tiny_config().checkpoint)
    assert ckpt.latest_step() is None
    ckpt.close()
    assert signal.getsignal(signal.SIGINT) == before


def test_non_finite_loss_stops_before_checkpointing(tmp_path):
    # lr 1e15: the first update is finite, the weights then overflow. Steps count from 1.
    config = tiny_config(**{"train.lr": 1e15, "checkpoint.every_steps": 1})
    with pytest.raises(NonFiniteError, match=r"at step (\d+); the last checkpoint is step") as info:
        train(config, str(tmp_path))
    bad = int(re.search(r"at step (\d+);", str(info.value)).group(1))
    ckpt = TrainCheckpointer(str(tmp_path), config.checkpoint)
    latest = ckpt.latest_step()
    ckpt.close()
    assert bad >= 2 and latest == bad - 1, (bad, latest)  # every finite step saved, no later one
    metrics = read_losses(str(tmp_path))
    assert len(metrics) == bad - 1 and all(np.isfinite(metrics))


def checked_train(config, workdir):
    """What `--mode=train` does: the one config check, then the loop (which checks nothing again
    but what needs the devices: the batch against the mesh)."""
    checks.check(config, "train")
    return train(config, workdir)


@pytest.mark.parametrize("key, value", [("train.lr", -1.0), ("train.lr", float("nan")),
                                        ("train.b2", 1.0), ("train.warmup_steps", -5)])
def test_bad_optimizer_values_fail_at_once(tmp_path, key, value):
    with pytest.raises(ValueError, match=rf"{re.escape(key)}={value}"):
        checked_train(tiny_config(**{key: value}), str(tmp_path))


def test_export_writes_ema_inference_checkpoint(reference_run, tmp_path):
    workdir = str(tmp_path)
    config = tiny_config(**{"train.num_steps": 1})
    result = train(config, workdir)
    out = export(config, workdir)
    params, saved = load_inference_checkpoint(out)
    assert saved["model"]["hidden_size"] == 32
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.device_get(reference_run[0].state.ema_params)
    )
    # The EMA weights, not the raw ones (after one step from the same init they differ).
    for exported, ema, _raw in zip(leaves(params), leaves(result.state.ema_params), leaves(result.state.params)):
        np.testing.assert_array_equal(exported, ema)
    assert any(not np.array_equal(e, r) for e, r in zip(leaves(result.state.ema_params), leaves(result.state.params)))

    # A command line with another model/diffusion config exports the weights' own config.
    changed = tiny_config(**{"train.num_steps": 1, "model.hidden_size": 64, "diffusion.beta_schedule": "cosine"})
    out = export(changed, workdir, output=str(tmp_path / "export_changed"))
    params_changed, saved_changed = load_inference_checkpoint(out)
    assert saved_changed["model"]["hidden_size"] == 32
    assert saved_changed["diffusion"]["beta_schedule"] == "linear"
    for a, b in zip(leaves(params_changed), leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("recipe"))
    train(tiny_config(**{"train.num_steps": 1}), workdir)
    return workdir


@pytest.mark.parametrize("key, value", [
    ("model.hidden_size", 64),  # a parameter shape: would fail deep inside orbax
    ("diffusion.beta_schedule", "cosine"),  # the objective
    ("diffusion.num_timesteps", 500),
    ("ptss.p", 0.5),
    ("data.seed", 7),  # the data stream
    ("train.batch_size", 16),
    ("train.lr", 3e-4),
])
def test_resume_refuses_a_changed_recipe(one_step_run, key, value):
    config = tiny_config(**{"train.num_steps": 2, key: value})
    saved = tiny_config()[key.split(".")[0]][key.split(".")[1]]
    with pytest.raises(ValueError, match=rf"trained with another recipe: {key}: {saved!r} -> {value!r}\. "
                                          r".*allow_recipe_change=True"):
        train(config, one_step_run)


def test_resume_allows_operational_changes_and_a_deliberate_recipe_change(one_step_run, tmp_path):
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(one_step_run, workdir)
    operational = {"train.num_steps": 2, "train.log_every_steps": 2, "data.device_prefetch": 0,
                   "mesh.shape": (2, 2, 2), "checkpoint.every_steps": 7,
                   "model.scan_layers": False}  # a layout mesh.fit may choose on other hardware
    assert train(tiny_config(**operational), workdir).step == 2
    result = train(tiny_config(**{"train.num_steps": 3, "train.lr": 3e-4, "train.allow_recipe_change": True}), workdir)
    assert result.step == 3


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
        checked_train(tiny_config(**overrides), str(tmp_path))


def test_unknown_config_keys_fail_at_once(tmp_path):
    config = tiny_config()
    config.train.unlock()
    config.train.learning_rate = 1.0
    with pytest.raises(ConfigError, match="train.learning_rate") as info:
        checked_train(config, str(tmp_path))
    assert "\n" not in str(info.value) and "lr" in str(info.value)  # one line, with a suggestion


def test_ffs_xl_recipe_builds_sharded_state_abstractly():
    from fvdm_jax.training.flops import model_flops_from_config

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


@pytest.mark.slow  # ~55 s on 2 cores; test_demo_quality (slow) trains the demo config whole
def test_demo_config_trains_on_the_shipped_clips(tmp_path):
    config = load_config(os.path.join(CONFIGS, "demo.py"))
    config.train.num_steps = 2
    config.train.batch_size = 8  # one video per simulated device
    config.checkpoint.async_save = False
    result = train(config, str(tmp_path))
    assert result.step == 2 and all(np.isfinite(read_losses(str(tmp_path))))


def test_sampling_restores_only_the_ema_weights(one_step_run, tmp_path):
    from fvdm_jax.sampling.weights import load_sampling_params

    config = tiny_config()
    model_config, diffusion_config, ema = load_sampling_params(config, one_step_run)
    full = TrainCheckpointer(one_step_run, config.checkpoint)
    state = full.restore_state(1, build_setup(config).abstract_state)
    full.close()
    for a, b in zip(leaves(ema), leaves(state.ema_params)):
        np.testing.assert_array_equal(a, b)
    assert model_config["hidden_size"] == 32 and diffusion_config["beta_schedule"] == "linear"

    # A checkpoint that holds nothing but the step and the EMA weights samples just the same:
    # neither the optimizer state nor the raw weights are read.
    stripped = str(tmp_path / "ema_only")
    ckpt = TrainCheckpointer(stripped, config.checkpoint)
    ckpt.save(1, {"step": state.step, "ema_params": state.ema_params}, config.to_dict(), force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    _, _, ema_only = load_sampling_params(config, stripped)
    for a, b in zip(leaves(ema_only), leaves(state.ema_params)):
        np.testing.assert_array_equal(a, b)

    # The weights' own shapes win over a command line that differs.
    model_config, _, _ = load_sampling_params(tiny_config(**{"model.hidden_size": 64}), one_step_run)
    assert model_config["hidden_size"] == 32

    # No checkpoint: one clear error, and no WORKDIR/checkpoints is created.
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="train first"):
        load_sampling_params(config, str(empty))
    with pytest.raises(FileNotFoundError, match="train first"):
        export(config, str(empty))
    assert not os.path.exists(empty / "checkpoints")


def test_a_restart_removes_unfinished_saves_and_keeps_finished_ones(one_step_run, tmp_path):
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(one_step_run, workdir)
    stale = os.path.join(workdir, "checkpoints", "7.orbax-checkpoint-tmp-1796170000")
    os.makedirs(os.path.join(stale, "state"))
    open(os.path.join(stale, "state", "chunk"), "wb").write(b"x" * 1000)
    assert train(tiny_config(**{"train.num_steps": 2}), workdir).step == 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
