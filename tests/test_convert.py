"""Official FVDM / Latte checkpoint conversion and the inference checkpoint format."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from fvdm_jax.checkpoint.inference import load_inference_checkpoint, save_inference_checkpoint
from fvdm_jax.convert.__main__ import convert_official, read_checkpoint
from fvdm_jax.convert.official import (
    convert_as_saved,
    convert_state_dict,
    infer_model_config,
    step_from_file_name,
    strip_key,
    to_official_state_dict,
    unwrap_state_dict,
)
from fvdm_jax.convert.tensors import ConversionError
from fvdm_jax.models.dit import DiT, model_from_config

VECTORS = os.environ.get(
    "FVDM_REFERENCE_VECTORS",
    os.path.join(os.path.dirname(__file__), "data", "fvdm_official_tiny.npz"),
)
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4, num_frames=4)
ROOT = os.path.join(os.path.dirname(__file__), "..")


def random_params(model, seed=0, labels=False):
    x = np.zeros((1, model.num_frames, model.input_size, model.input_size, model.in_channels), np.float32)
    t = np.zeros((1, model.num_frames), np.int32)
    y = np.zeros((1,), np.int32) if labels else None
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, y))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_roundtrip_through_official_layout(num_classes):
    model = DiT(**TINY, num_classes=num_classes)
    params = random_params(model, labels=num_classes > 0)
    sd = to_official_state_dict(params, model)
    assert sd["blocks_spatial.1.attn.qkv.weight"].shape == (96, 32)
    assert sd["x_embedder.proj.weight"].shape == (32, 4, 2, 2)
    assert_trees_equal(convert_state_dict(sd, model), params)


def test_latte_alternating_names_and_containers():
    model = DiT(**TINY)
    params = random_params(model, seed=1)
    sd = to_official_state_dict(params, model)
    latte = {}
    for key, value in sd.items():
        for kind, offset in (("blocks_spatial.", 0), ("blocks_temp.", 1)):
            if key.startswith(kind):
                i, rest = key[len(kind):].split(".", 1)
                key = f"blocks.{2 * int(i) + offset}.{rest}"
        latte[key] = value
    assert_trees_equal(convert_state_dict(latte, model), params)
    wrapped = {"ema": {f"module.{k}": v for k, v in sd.items()}, "opt": {"step": 3}}
    assert_trees_equal(convert_state_dict(unwrap_state_dict(wrapped), model), params)
    assert_trees_equal(convert_state_dict(unwrap_state_dict({"model": sd}), model), params)


def official_training_checkpoint(model, raw, ema, as_torch=False):
    """What the official train_video.py saves: {'model': raw weights, 'ema': EMA weights, 'opt':
    the AdamW state_dict}, in that order; raw and ema are {'params': ...} trees (they differ)."""
    raw_sd, ema_sd = to_official_state_dict(raw, model), to_official_state_dict(ema, model)
    names = sorted(raw_sd)
    opt = {"state": {i: {"step": np.float32(7.0), "exp_avg": np.zeros_like(raw_sd[k]),
                         "exp_avg_sq": np.ones_like(raw_sd[k])} for i, k in enumerate(names)},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                             "amsgrad": False, "params": list(range(len(names)))}]}
    checkpoint = {"model": raw_sd, "ema": ema_sd, "opt": opt}
    if as_torch:
        import torch

        def tensors(tree):
            if isinstance(tree, dict):
                return {k: tensors(v) for k, v in tree.items()}
            if isinstance(tree, np.ndarray):
                return torch.from_numpy(np.ascontiguousarray(tree))
            return torch.tensor(float(tree)) if isinstance(tree, np.floating) else tree
        checkpoint = tensors(checkpoint)
    return checkpoint


def test_a_training_checkpoint_converts_its_ema_not_its_raw_weights():
    """The official training checkpoints hold both the raw weights and the EMA (what the
    official sampler loads); they differ, and the EMA is the one converted."""
    model = DiT(**TINY)
    raw, ema = random_params(model, seed=10), random_params(model, seed=11)
    checkpoint = official_training_checkpoint(model, raw, ema)
    assert_trees_equal(convert_state_dict(unwrap_state_dict(checkpoint), model), ema)
    ddp = {key: {f"module.{k}": v for k, v in checkpoint[key].items()} for key in ("model", "ema")}
    assert_trees_equal(convert_state_dict(unwrap_state_dict(ddp), model), ema)
    # Without an EMA, the raw weights are the model.
    assert_trees_equal(convert_state_dict(unwrap_state_dict({"model": checkpoint["model"],
                                                             "opt": checkpoint["opt"]}), model), raw)


def test_conversion_errors_are_specific():
    model = DiT(**TINY)
    sd = to_official_state_dict(random_params(model), model)
    with pytest.raises(ConversionError, match="model.depth"):
        convert_state_dict(sd, DiT(**{**TINY, "depth": 6}))
    with pytest.raises(ConversionError, match="no place in the model"):
        convert_state_dict({**sd, "extra.weight": np.zeros(3)}, model)
    with pytest.raises(ConversionError, match="pos_embed"):
        convert_state_dict(sd, DiT(**{**TINY, "input_size": 4}))
    with pytest.raises(ConversionError, match="shape mismatch|parameter names"):
        convert_state_dict(sd, DiT(**{**TINY, "learn_sigma": False}))
    with pytest.raises(ConversionError, match="no model state_dict"):
        unwrap_state_dict({"optimizer": {"lr": 1}})
    with pytest.raises(ConversionError, match="head count"):
        infer_model_config(sd)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint("/nonexistent/ckpt.pt")


def test_infer_named_size_config():
    hidden, depth, heads = 384, 12, 6
    model = DiT(hidden_size=hidden, depth=depth, num_heads=heads, num_classes=101)
    sd = {
        "x_embedder.proj.weight": np.zeros((hidden, 4, 2, 2)),
        "final_layer.linear.weight": np.zeros((32, hidden)),
        "pos_embed": np.zeros((1, 256, hidden)),
        "temp_embed": np.zeros((1, 16, hidden)),
        "y_embedder.embedding_table.weight": np.zeros((102, hidden)),
        **{f"blocks_spatial.{i}.attn.qkv.weight": np.zeros(1) for i in range(6)},
        **{f"blocks_temp.{i}.attn.qkv.weight": np.zeros(1) for i in range(6)},
    }
    config = infer_model_config(sd)
    assert config["size"] == "S" and config["num_classes"] == 101 and config["learn_sigma"]
    built = model_from_config(config)
    assert (built.hidden_size, built.depth, built.num_heads, built.input_size) == (
        model.hidden_size, model.depth, model.num_heads, 32)


def test_cli_converts_official_vectors_and_reproduces_their_output(tmp_path):
    """End to end: npz state_dict -> CLI -> inference checkpoint -> same output as PyTorch."""
    with np.load(VECTORS) as data:
        ref = {k: data[k] for k in data.files}
    cfg = json.loads(str(ref["config_json"]))
    out_dir = tmp_path / "ckpt"
    cmd = [
        sys.executable, "-m", "fvdm_jax.convert", "official",
        f"--checkpoint={VECTORS}", "--prefix=uncond_sd/", f"--output={out_dir}",
        f"--num_heads={cfg['num_heads']}",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    params, config = load_inference_checkpoint(str(out_dir))
    assert config["diffusion"]["num_timesteps"] == 1000
    model = model_from_config(config["model"])
    out = jax.jit(model.apply)(params, ref["x0"].transpose(0, 1, 3, 4, 2), ref["t"])
    want = ref["model_uncond_out"].transpose(0, 1, 3, 4, 2)
    assert np.max(np.abs(np.asarray(out) - want)) <= 1e-4 * max(1.0, np.abs(want).max())

    # A second conversion into the same place refuses to overwrite.
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1 and "already exists" in result.stderr


def test_inference_checkpoint_roundtrip_and_missing_dir(tmp_path):
    model = DiT(**TINY)
    params = random_params(model, seed=2)
    save_inference_checkpoint(str(tmp_path / "c"), params, dict(size="custom", **TINY), {"num_timesteps": 50})
    loaded, config = load_inference_checkpoint(str(tmp_path / "c"))
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, loaded), params)
    assert config["model"]["hidden_size"] == 32 and config["diffusion"] == {"num_timesteps": 50}
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_inference_checkpoint(str(tmp_path / "missing"))


def test_torch_training_checkpoint_converts_and_samples_with_its_ema(tmp_path):
    """A .pt training checkpoint ({'model', 'ema', 'opt'}, raw weights != EMA) through
    read_checkpoint, the converter (`python -m fvdm_jax.convert`'s function) and into sampling:
    the EMA weights all the way."""
    pytest.importorskip("torch")
    import torch

    from fvdm_jax.config.load import load_config
    from fvdm_jax.sampling.weights import load_sampling_params

    model = DiT(**TINY)
    raw, ema = random_params(model, seed=3), random_params(model, seed=30)
    path = tmp_path / "0004000.pt"
    torch.save(official_training_checkpoint(model, raw, ema, as_torch=True), path)
    assert_trees_equal(convert_state_dict(read_checkpoint(str(path)), model), ema)
    config_dir = tmp_path / "out"
    convert_official(str(path), str(config_dir), num_heads=4)
    loaded, config = load_inference_checkpoint(str(config_dir))
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, loaded), ema)
    assert config["model"]["size"] == "custom"
    sample_config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    sample_config.sample.checkpoint = str(config_dir)
    model_config, _, params = load_sampling_params(sample_config, str(tmp_path / "no_workdir"))
    assert model_config["hidden_size"] == TINY["hidden_size"]
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, params), ema)


def test_safetensors_checkpoint_needs_no_extra_package(tmp_path):
    from fvdm_jax.convert.tensors import write_safetensors

    model = DiT(**TINY)
    params = random_params(model, seed=4)
    path = tmp_path / "ckpt.safetensors"
    write_safetensors(str(path), to_official_state_dict(params, model))
    convert_official(str(path), str(tmp_path / "out"), num_heads=4)
    loaded, _ = load_inference_checkpoint(str(tmp_path / "out"))
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, loaded), params)


def test_compile_and_ddp_prefixes_are_stripped_as_the_official_sampler_does():
    model = DiT(**TINY)
    params = random_params(model, seed=5)
    sd = to_official_state_dict(params, model)
    for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        wrapped = {"ema": {prefix + k: v for k, v in sd.items()}}
        unwrapped = unwrap_state_dict(wrapped)
        assert set(unwrapped) == set(sd)
        assert_trees_equal(convert_state_dict(unwrapped, model), params)
    assert strip_key("blocks_temp.0._orig_mod.attn.qkv.weight") == "attn.qkv.weight"  # the official split
    with pytest.raises(ConversionError, match=r"'pos_embed' and '_orig_mod.pos_embed' both name 'pos_embed'"):
        unwrap_state_dict({**sd, "_orig_mod.pos_embed": sd["pos_embed"]})


def test_unknown_and_missing_keys_are_one_line_listing_them(tmp_path):
    from fvdm_jax.convert.tensors import write_safetensors
    from fvdm_jax.errors import ConfigError

    model = DiT(**TINY)
    sd = to_official_state_dict(random_params(model, seed=6), model)
    extra = {f"extra_head.{i}.weight": np.zeros(2, np.float32) for i in range(14)}
    with pytest.raises(ConversionError) as error:
        convert_state_dict({**sd, **extra}, model)
    message = str(error.value)
    assert "\n" not in message and message.startswith("14 checkpoint tensors have no place in the model")
    assert "extra_head.0.weight, extra_head.1.weight" in message and "and 2 more" in message
    incomplete = {k: v for k, v in sd.items() if k not in ("blocks_temp.1.mlp.fc2.bias", "t_embedder.mlp.0.weight")}
    with pytest.raises(ConversionError, match=r"lacks 2 tensors the model needs: blocks_temp.1.mlp.fc2.bias, "
                                              r"t_embedder.mlp.0.weight;") as error:
        convert_state_dict(incomplete, model)
    assert isinstance(error.value, ConfigError)  # what `python -m fvdm_jax.main` prints in one line
    path = tmp_path / "extra.safetensors"
    write_safetensors(str(path), {**sd, "lora.up.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match=r"1 checkpoint tensors have no place in the model: lora.up.weight;"):
        convert_official(str(path), str(tmp_path / "out"), num_heads=4)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match=r"unknown checkpoint type '.txt'"):
        (tmp_path / "w.txt").write_text("x")
        read_checkpoint(str(tmp_path / "w.txt"))


def test_convert_as_saved_keeps_what_fits_and_names_the_rest():
    hidden, depth = 384, 12  # S: its head count comes from the named size
    model = DiT(hidden_size=hidden, depth=depth, num_heads=6, input_size=8, num_frames=4, num_classes=2)
    params = random_params(model, seed=7, labels=True)
    sd = {**to_official_state_dict(params, model), "lora.up.weight": np.zeros(1, np.float32)}
    converted, config, unplaced = convert_as_saved(sd)
    assert unplaced == ["lora.up.weight"] and config["size"] == "S" and config["num_classes"] == 2
    assert config["num_frames"] == 4 and config["input_size"] == 8
    assert_trees_equal(converted, params)
    assert step_from_file_name("/runs/x/checkpoints/0250000.pt") == 250000
    assert step_from_file_name("ffs_xl.pt") is None
