"""The Wan converter (fvdm_jax/convert/wan.py, `python -m fvdm_jax.convert wan`): every layout and
naming it reads gives the same parameters; a missing or an extra tensor is one ConversionError line
that names it. The outputs themselves are checked against diffusers in tests/test_wan.py."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_wan import tiny_diffusers  # noqa: E402

from fvdm_jax.checkpoint.inference import load_inference_checkpoint  # noqa: E402
from fvdm_jax.convert.__main__ import convert_wan  # noqa: E402
from fvdm_jax.convert.tensors import ConversionError  # noqa: E402
from fvdm_jax.convert.wan import diffusers_to_original, original_to_diffusers  # noqa: E402

# diffusers -> original Wan module names, written from the public conversion script
# (diffusers scripts/convert_wan_to_diffusers.py, TRANSFORMER_KEYS_RENAME_DICT, read backwards).
# The original block calls its norms norm1, norm3 (cross-attention, affine), norm2.
TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"),
    (".attn1.to_out.0", ".self_attn.o"),
    (".attn2.to_out.0", ".cross_attn.o"),
    (".attn1.to_", ".self_attn."),
    (".attn2.to_", ".cross_attn."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".ffn.net.0.proj", ".ffn.0"),
    (".ffn.net.2", ".ffn.2"),
    (".norm2.", ".norm3."),
    (".scale_shift_table", ".modulation"),
]


def original_name(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    for theirs, ours in TO_ORIGINAL:
        key = key.replace(theirs, ours)
    return key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers model, its folder, params converted from it)."""
    root = tmp_path_factory.mktemp("wan_convert")
    model = tiny_diffusers(seed=3)
    model.save_pretrained(root / "single")
    convert_wan(str(root / "single"), str(root / "out"))
    params, config = load_inference_checkpoint(str(root / "out"))
    assert config["model"]["architecture"] == "wan" and config["model"]["num_heads"] == 2
    return model, root / "single", params


def assert_same_params(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def convert_and_load(source, out, **kwargs):
    convert_wan(str(source), str(out), **kwargs)
    return load_inference_checkpoint(str(out))


def test_sharded_folder_with_index_converts_to_the_same_params(reference, tmp_path):
    model, _, params = reference
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    names = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 1
    assert_same_params(convert_and_load(tmp_path / "sharded", tmp_path / "out")[0], params)


def test_a_diffusers_pipeline_folder_is_read_from_its_transformer_folder(reference, tmp_path):
    model, _, params = reference
    model.save_pretrained(tmp_path / "pipeline" / "transformer")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert_same_params(convert_and_load(tmp_path / "pipeline", tmp_path / "out")[0], params)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_wan_names_convert_to_the_same_params(reference, tmp_path, prefix):
    """The original / DiffSynth names (optionally under a ComfyUI-style prefix), no config.json:
    the shape comes from the tensors, the head count from --num_heads (width 24 is not 128k)."""
    model, _, params = reference
    sd = {prefix + original_name(k): v.contiguous() for k, v in model.state_dict().items()}
    assert "blocks.1.norm3.weight" in {k[len(prefix):] for k in sd}
    assert all(original_to_diffusers(k[len(prefix):]) == d for k, d in
               zip(sd, model.state_dict()))
    assert all(diffusers_to_original(d) == k[len(prefix):] for k, d in zip(sd, model.state_dict()))
    path = tmp_path / "wan.safetensors"
    safetensors_torch.save_file(sd, str(path))
    with pytest.raises(ConversionError, match="--num_heads"):
        convert_wan(str(path), str(tmp_path / "no_heads"))
    converted, config = convert_and_load(path, tmp_path / "out", num_heads=2)
    assert_same_params(converted, params)
    assert config["model"]["rope_max_seq_len"] == 1024  # not in the tensors: Wan's default


def test_original_names_in_a_torch_file_with_config_json(reference, tmp_path):
    model, _, params = reference
    sd = {original_name(k): v for k, v in model.state_dict().items()}
    (tmp_path / "ckpt").mkdir()
    torch.save(sd, tmp_path / "ckpt" / "model.pt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(
        {"_class_name": "WanModel", "model_type": "t2v", "dim": 24, "num_heads": 2, "eps": 1e-6}))
    converted, _ = convert_and_load(tmp_path / "ckpt" / "model.pt", tmp_path / "out")
    assert_same_params(converted, params)


def test_bf16_weights_stay_bf16_unless_a_dtype_is_asked(reference, tmp_path):
    _, _, params = reference
    tiny_diffusers(seed=3).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    converted, config = convert_and_load(tmp_path / "bf16", tmp_path / "out")
    assert {a.dtype for a in jax.tree_util.tree_leaves(converted)} == {np.dtype(ml_dtypes.bfloat16)}
    assert config["model"]["param_dtype"] == config["model"]["dtype"] == "bfloat16"
    expected = jax.tree_util.tree_map(lambda a: a.astype(ml_dtypes.bfloat16), params)
    assert_same_params(converted, expected)
    cast, config = convert_and_load(tmp_path / "bf16", tmp_path / "out32", dtype="float32")
    assert {a.dtype for a in jax.tree_util.tree_leaves(cast)} == {np.dtype(np.float32)}
    assert config["model"]["param_dtype"] == "float32"


def _broken(reference, tmp_path, edit):
    model, folder, _ = reference
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    edit(sd)
    (tmp_path / "broken").mkdir()
    safetensors_torch.save_file(sd, str(tmp_path / "broken" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "broken" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ConversionError) as error:
        convert_wan(str(tmp_path / "broken"), str(tmp_path / "out"))
    message = str(error.value)
    assert "\n" not in message
    assert not (tmp_path / "out").exists()
    return message


def test_a_missing_tensor_is_one_line_naming_it(reference, tmp_path):
    message = _broken(reference, tmp_path, lambda sd: sd.pop("blocks.1.attn2.norm_k.weight"))
    assert "lacks 1 tensors" in message and "blocks.1.attn2.norm_k.weight" in message


def test_an_extra_tensor_is_one_line_naming_it(reference, tmp_path):
    message = _broken(reference, tmp_path, lambda sd: sd.update(
        {"blocks.0.attn1.extra.weight": torch.zeros(3)}))
    assert "1 tensors have no place" in message and "blocks.0.attn1.extra.weight" in message


def test_image_to_video_checkpoints_are_refused(reference, tmp_path):
    _, folder, _ = reference
    (tmp_path / "i2v").mkdir()
    config = json.loads((folder / "config.json").read_text()) | {"image_dim": 1280}
    (tmp_path / "i2v" / "config.json").write_text(json.dumps(config))
    for f in folder.glob("*.safetensors"):
        (tmp_path / "i2v" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="image-to-video"):
        convert_wan(str(tmp_path / "i2v"), str(tmp_path / "out"))
