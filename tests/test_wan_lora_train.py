"""LoRA fine-tuning of a tiny Wan on 8 simulated CPU devices, from a released-style inference
checkpoint (train.init_from): the loss falls; only the adapters change (the frozen weights are
bit-identical to the checkpoint's after training); the optimizer state and the checkpoints hold
the adapters alone; a killed-and-resumed run equals an uninterrupted one; the merged export
equals base + alpha / r A B; the adapter export reloads (lora.init_from) as the same adapters;
full fine-tuning from the same checkpoint starts from its weights."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from fvdm_jax.checkpoint.inference import load_inference_checkpoint, save_inference_checkpoint
from fvdm_jax.config import checks
from fvdm_jax.config.load import load_config
from fvdm_jax.errors import ConfigError
from fvdm_jax.jobs.export import export
from fvdm_jax.models.build import flat_model_config, init_inputs, model_from_config
from fvdm_jax.models.lora import split
from fvdm_jax.training.loop import train
from fvdm_jax.training.setup import build_setup
from fvdm_jax.training.wan_init import first_state

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_tiny.py")
RANK, ALPHA, STEPS = 4, 8.0, 24


def host(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Wan's random weights as an inference checkpoint (what the converter writes). Every
    weight is random (a fresh Wan's zero-initialized projections would gate its blocks off, as
    no released model does, and leave the adapters without gradient)."""
    config = load_config(CONFIG)
    flat = dict(flat_model_config(config.model))
    model = model_from_config(flat)
    params = nn.unbox(model.init(jax.random.key(7), *init_inputs(model)))
    rng = np.random.default_rng(7)
    params = jax.tree_util.tree_map(
        lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32), params)
    path = str(tmp_path_factory.mktemp("base") / "wan")
    save_inference_checkpoint(path, host(params), flat, {"process": "flow", "shift": 5.0})
    return path, host(params)


def lora_config(base_path, **overrides):
    config = load_config(CONFIG)
    config.train.init_from = base_path
    config.train.num_steps = STEPS
    config.train.lr = 3e-2
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 100
    config.checkpoint.async_save = False
    config.lora.rank, config.lora.alpha = RANK, ALPHA
    for path, value in overrides.items():
        section, key = path.split(".")
        config[section][key] = value
    checks.check(config, "train")
    return config


def losses(workdir):
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora_reference"))
    result = train(lora_config(base[0]), workdir)
    return workdir, result


def test_lora_trains_only_the_adapters(base, reference):
    _, base_params = base
    workdir, result = reference
    state = result.state
    assert result.step == STEPS and result.compilations == 1
    seen = losses(workdir)
    assert np.mean(seen[-4:]) < 0.8 * np.mean(seen[:4]), seen
    # The frozen weights: exactly the checkpoint's.
    frozen = host(state.frozen)
    want = split(base_params)[1]
    assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    # Trainable: the adapters alone; the optimizer state is the adapters' only.
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)}
    assert names and all("lora_down" in n or "lora_up" in n for n in names)
    adapter_sizes = sum(int(a.size) for a in jax.tree_util.tree_leaves(state.params))
    opt_sizes = sum(int(a.size) for a in jax.tree_util.tree_leaves(state.opt_state) if a.ndim)
    assert opt_sizes == 2 * adapter_sizes  # AdamW's mu and nu, nothing for the base
    ups = [a for p, a in jax.tree_util.tree_leaves_with_path(host(state.params)) if "lora_up" in str(p)]
    assert all(np.abs(u).max() > 0 for u in ups)  # B left zero: the adapters trained


def test_checkpoints_hold_the_adapters_alone(reference):
    import orbax.checkpoint as ocp

    workdir, _ = reference
    meta = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", str(STEPS),
                                                            "state"))
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda m: hasattr(m, "shape"))]
    assert any("lora_up" in p for p in paths), paths
    assert not any("kernel" in p or "frozen" in p for p in paths), paths


def test_resume_is_exact(base, reference, tmp_path):
    workdir, result = reference
    config = lora_config(base[0], **{"train.num_steps": STEPS // 2})
    resumed_dir = str(tmp_path / "resumed")
    train(config, resumed_dir)
    config.train.num_steps = STEPS
    again = train(config, resumed_dir)
    for a, b in zip(jax.tree_util.tree_leaves(host(again.state.params)),
                    jax.tree_util.tree_leaves(host(result.state.params))):
        np.testing.assert_array_equal(a, b)
    assert losses(resumed_dir) == losses(workdir)


def test_merged_export_is_base_plus_scaled_adapters(base, reference, tmp_path):
    _, base_params = base
    workdir, result = reference
    config = lora_config(base[0])
    out = export(config, workdir, output=str(tmp_path / "merged"))
    merged, saved = load_inference_checkpoint(out)
    assert "lora_rank" not in saved["model"]  # a plain Wan checkpoint
    ema = host(result.state.ema_params)["params"]["blocks"]["self_attn"]["q"]
    down, up = ema["lora_down"], ema["lora_up"]  # (L, D, r), (L, r, H, Dh)
    kernel = base_params["params"]["blocks"]["self_attn"]["q"]["kernel"]  # (L, D, H, Dh)
    want = kernel + ALPHA / RANK * np.einsum("ldr,lrhk->ldhk", down, up)
    np.testing.assert_allclose(merged["params"]["blocks"]["self_attn"]["q"]["kernel"], want,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["params"]["blocks"]["modulation"],
                                  base_params["params"]["blocks"]["modulation"])


def test_adapter_export_reloads_as_the_same_adapters(base, reference, tmp_path):
    workdir, result = reference
    config = lora_config(base[0], **{"lora.export": "adapter"})
    out = export(config, workdir, output=str(tmp_path / "adapter"))
    path = os.path.join(out, "lora.safetensors")
    assert os.path.exists(path)
    config = lora_config(base[0], **{"lora.init_from": path})
    fresh = first_state(build_setup(config), config)
    for a, b in zip(jax.tree_util.tree_leaves(host(fresh.params)),
                    jax.tree_util.tree_leaves(host(result.state.ema_params))):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_full_fine_tuning_starts_from_the_checkpoint(base, tmp_path):
    _, base_params = base
    config = lora_config(base[0], **{"lora.rank": 0})
    state = first_state(build_setup(config), config)
    assert state.frozen is None
    for a, b in zip(jax.tree_util.tree_leaves(host(state.params)),
                    jax.tree_util.tree_leaves(base_params)):
        np.testing.assert_array_equal(a, b)


def test_lora_errors_are_one_line(base, tmp_path):
    for overrides, message in (({"lora.rank": 8, "lora.init_from": "/nonexistent.safetensors"},
                                "does not exist"),
                               ({"train.init_from": str(tmp_path / "missing")}, "train.init_from=")):
        with pytest.raises(ConfigError, match=message) as error:
            train(lora_config(base[0], **overrides), str(tmp_path / "w"))
        assert "\n" not in str(error.value)
    dit = load_config(os.path.join(os.path.dirname(CONFIG), "tiny.py"))
    dit.lora.rank = 4
    with pytest.raises(ConfigError, match="LoRA is implemented for Wan"):
        checks.check(dit, "train")


def test_sampling_a_lora_run_uses_the_merged_weights(base, reference, tmp_path):
    from fvdm_jax.sampling.weights import load_sampling_params

    workdir, _ = reference
    config = lora_config(base[0])
    model_config, _, params = load_sampling_params(config, workdir)
    merged, _ = load_inference_checkpoint(export(config, workdir, output=str(tmp_path / "m")))
    for a, b in zip(jax.tree_util.tree_leaves(host(params)), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_array_equal(a, b)
    assert "lora_up" not in str(jax.tree_util.tree_structure(params))
