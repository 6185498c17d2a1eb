"""The SD KL-f8 autoencoder against diffusers' golden vectors, and the diffusers VAE converter.

tests/data/vae_{small,sd}.npz come from tools/make_vae_vectors.py (diffusers' AutoencoderKL,
float32, CPU). They hold inputs and outputs only: the weights are regenerated here from the same
seed by the script's own numpy `random_state_dict`, written as a diffusers folder and read back
through `load_diffusers_vae`, so the converter is part of every golden test.
"""

import importlib.util
import json
import os

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fvdm_jax.convert.diffusers_vae import (
    convert_state_dict,
    diffusers_tensor_shapes,
    load_diffusers_vae,
    to_diffusers_state_dict,
)
from fvdm_jax.convert.tensors import ConversionError, read_safetensors, write_safetensors
from fvdm_jax.models.vae import (
    AutoencoderKL,
    decode_video,
    encode_video,
    latents_from_posterior,
    vae_from_config,
)

ROOT = os.path.join(os.path.dirname(__file__), "..")
DATA = os.path.join(os.path.dirname(__file__), "data")


def _load_tool():
    path = os.path.join(ROOT, "tools", "make_vae_vectors.py")
    spec = importlib.util.spec_from_file_location("make_vae_vectors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # numpy only at import time; torch is imported in main()
    return module


TOOL = _load_tool()


def load_vectors(name):
    with np.load(os.path.join(DATA, f"vae_{name}.npz")) as data:
        vectors = {k: data[k] for k in data.files}
    vectors["config"] = json.loads(str(vectors["config_json"]))
    vectors["tensors"] = json.loads(str(vectors["tensors_json"]))
    return vectors


def write_vae_folder(folder, config, state_dict, fmt="safetensors"):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", **config}, f)
    if fmt == "safetensors":
        write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), state_dict)
    else:
        import torch

        sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
        torch.save(sd, os.path.join(folder, "diffusion_pytorch_model.bin"))
    return str(folder)


def nhwc(x):
    return einops.rearrange(x, "n c h w -> n h w c")


def assert_golden(got, ref, label):
    """max|got - ref| <= 1e-4 * max(1, max|ref|), ref in torch layout (N, C, H, W)."""
    ref = nhwc(ref)
    assert got.shape == ref.shape, (label, got.shape, ref.shape)
    err = float(np.max(np.abs(np.asarray(got, np.float64) - ref)))
    tol = 1e-4 * max(1.0, float(np.max(np.abs(ref))))
    print(f"{label}: max abs err {err:.2e} (tol {tol:.1e}, max|ref| {np.max(np.abs(ref)):.2f})")
    assert err <= tol, f"{label}: max abs err {err} > {tol}"


def encode_decode(vae, params, x, z):
    """One compiled program for encode(x) and decode(z)."""
    fn = jax.jit(
        lambda p, x, z: vae.apply(p, x, z, method=lambda m, x, z: (*m.encode(x), m.decode(z)))
    )
    return fn(params, x, z)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    vectors = load_vectors("small")
    state_dict = TOOL.random_state_dict(vectors["tensors"], int(vectors["seed"]))
    folder = write_vae_folder(tmp_path_factory.mktemp("vae_small"), vectors["config"], state_dict)
    vae, params = load_diffusers_vae(folder)
    return dict(vectors=vectors, state_dict=state_dict, folder=folder, vae=vae, params=params)


@pytest.fixture(scope="module")
def frame_fns(small):
    """Jitted per-batch encode/decode of the small model, shared so each compiles once."""
    vae = small["vae"]
    encode = jax.jit(lambda p, x: vae.apply(p, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda p, z: vae.apply(p, z, method=AutoencoderKL.decode))
    return encode, decode


VIDEO_SHAPE = (8, 2, 16, 16, 3)  # (B, F, H, W, 3): B shards over the 8 test devices


def pad_frames(x, n):
    return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


@pytest.mark.parametrize("name", ["small", "sd"])
def test_golden_vectors(name, request, tmp_path):
    if name == "small":
        vectors, params = (request.getfixturevalue("small")[k] for k in ("vectors", "params"))
        # Padded to the frame count of the shared programs, which then compile once for the file.
        encode, decode = request.getfixturevalue("frame_fns")
        n, frames = len(vectors["x"]), VIDEO_SHAPE[0] * VIDEO_SHAPE[1]
        mean, logvar = (t[:n] for t in encode(params, pad_frames(nhwc(vectors["x"]), frames)))
        decoded = decode(params, pad_frames(nhwc(vectors["z"]), frames))[:n]
    else:  # the real SD config: 84M weights, regenerated and converted here, then dropped
        vectors = load_vectors(name)
        state_dict = TOOL.random_state_dict(vectors["tensors"], int(vectors["seed"]))
        vae, params = load_diffusers_vae(write_vae_folder(tmp_path, vectors["config"], state_dict))
        del state_dict
        assert vae.block_out_channels == (128, 256, 512, 512) and vae.norm_num_groups == 32
        mean, logvar, decoded = encode_decode(vae, params, nhwc(vectors["x"]), nhwc(vectors["z"]))
    assert_golden(mean, vectors["mean"], f"{name} mean")
    assert_golden(logvar, vectors["logvar"], f"{name} logvar")
    assert_golden(decoded, vectors["decoded"], f"{name} decoded")


def test_real_config_names_match_diffusers():
    """The SD config's parameters are exactly diffusers' tensors (names and torch shapes)."""
    vectors = load_vectors("sd")
    shapes = diffusers_tensor_shapes(vae_from_config(vectors["config"]))
    assert sorted([name, list(shape)] for name, shape in shapes.items()) == vectors["tensors"]
    assert sum(np.prod(shape) for shape in shapes.values()) == 83_653_863


def test_state_dict_round_trip(small):
    back = to_diffusers_state_dict(small["params"])
    assert sorted(back) == sorted(small["state_dict"])
    for name, value in small["state_dict"].items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_legacy_attention_names_and_conv_shaped_weights(small):
    legacy = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for name, value in small["state_dict"].items():
        for new, old in renames.items():
            if f".attentions.0.{new}." in name:
                name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
                if name.endswith(".weight"):
                    value = value[:, :, None, None]  # (out, in) -> (out, in, 1, 1)
        legacy[name] = value
    assert any(".attentions.0.proj_attn.weight" in n and v.ndim == 4 for n, v in legacy.items())
    converted = convert_state_dict(legacy, small["vae"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, small["params"])


def test_torch_bin_checkpoint_and_pipeline_folder(small, tmp_path):
    pytest.importorskip("torch")
    folder = write_vae_folder(
        tmp_path / "pipeline" / "vae", small["vectors"]["config"], small["state_dict"], "bin"
    )
    vae, params = load_diffusers_vae(str(tmp_path / "pipeline"))  # a pipeline root finds vae/
    assert vae == small["vae"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, small["params"])
    assert os.path.basename(folder) == "vae"


def test_safetensors_reader_dtypes_and_package_agreement(tmp_path):
    import ml_dtypes

    tensors = {
        "f32": np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5.5,
        "f16": np.linspace(-2, 2, 7).astype(np.float16),
        "bf16": np.linspace(-3, 3, 6).astype(ml_dtypes.bfloat16).reshape(2, 3),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "bool": np.array([True, False, True]),
        "scalar": np.float32(3.25),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, tensors, metadata={"format": "np"})
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    assert header_len % 8 == 0 and header["__metadata__"] == {"format": "np"}
    got = read_safetensors(path, use_package=False)
    assert sorted(got) == sorted(tensors)
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and got[name].shape == np.shape(value), name
        np.testing.assert_array_equal(got[name], value)
    safetensors = pytest.importorskip("safetensors.numpy")
    no_bf16 = {k: v for k, v in tensors.items() if k != "bf16"}
    package_path = str(tmp_path / "package.safetensors")
    safetensors.save_file({k: np.asarray(v) for k, v in no_bf16.items()}, package_path)
    for use_package in (False, True):
        got = read_safetensors(package_path, use_package=use_package)
        for name, value in no_bf16.items():
            np.testing.assert_array_equal(got[name], value)
    write_safetensors(path, no_bf16)
    for name, value in safetensors.load_file(path).items():
        np.testing.assert_array_equal(value, no_bf16[name])


def _one_line_error(exc_info, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_converter_errors(small, tmp_path):
    config, state_dict, vae = small["vectors"]["config"], small["state_dict"], small["vae"]

    missing = dict(state_dict)
    del missing["decoder.mid_block.attentions.0.to_k.bias"]
    with pytest.raises(ConversionError) as e:
        convert_state_dict(missing, vae)
    _one_line_error(e, "lacks 1 tensors", "decoder.mid_block.attentions.0.to_k.bias")

    extra = {**state_dict, "encoder.down_blocks.0.resnets.1.conv1.weight": np.zeros((32, 32, 3, 3))}
    with pytest.raises(ConversionError) as e:
        convert_state_dict(extra, vae)
    _one_line_error(e, "does not use", "encoder.down_blocks.0.resnets.1.conv1.weight")

    wrong = {**state_dict, "encoder.conv_in.weight": state_dict["encoder.conv_in.weight"][:16]}
    with pytest.raises(ConversionError) as e:
        convert_state_dict(wrong, vae)
    _one_line_error(e, "encoder.conv_in.weight", "(16, 3, 3, 3)", "(32, 3, 3, 3)")

    deeper = vae.clone(layers_per_block=2)  # config.json that does not match the weights
    with pytest.raises(ConversionError) as e:
        convert_state_dict(state_dict, deeper)
    _one_line_error(e, "lacks", "layers_per_block")

    with pytest.raises(FileNotFoundError) as e:
        load_diffusers_vae(str(tmp_path / "nowhere"))
    _one_line_error(e, "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_diffusers_vae(str(tmp_path / "empty"))
    _one_line_error(e, "no config.json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError) as e:
        load_diffusers_vae(str(no_weights))
    _one_line_error(e, "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as e:
        load_diffusers_vae(small["folder"], variant="fp16")
    _one_line_error(e, "diffusion_pytorch_model.fp16.safetensors")

    bad_config = tmp_path / "gelu"
    write_vae_folder(bad_config, {**config, "act_fn": "gelu"}, {"x": np.zeros(1, np.float32)})
    with pytest.raises(ConversionError) as e:
        load_diffusers_vae(str(bad_config))
    _one_line_error(e, "act_fn='gelu'")
    with pytest.raises(ValueError) as e:
        vae_from_config({**config, "down_block_types": ["DownBlock2D"] * 2})
    _one_line_error(e, "DownEncoderBlock2D")
    with pytest.raises(ValueError) as e:
        vae_from_config({**config, "norm_type": "spatial"})
    _one_line_error(e, "norm_type")
    with pytest.raises(ValueError) as e:
        vae_from_config({**config, "latents_mean": [0.0] * 4, "latents_std": None})
    _one_line_error(e, "latents_mean")
    assert vae_from_config({**config, "latents_mean": None, "force_upcast": True}) == vae

    truncated = tmp_path / "truncated.safetensors"
    with open(os.path.join(small["folder"], "diffusion_pytorch_model.safetensors"), "rb") as f:
        blob = f.read()
    truncated.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(ConversionError) as e:
        read_safetensors(str(truncated), use_package=False)
    _one_line_error(e, "truncated or corrupt")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ConversionError) as e:
        read_safetensors(str(garbage), use_package=False)
    _one_line_error(e, "bad JSON header")


def test_logvar_clipped_like_diffusers(small, frame_fns):
    params = jax.tree_util.tree_map(np.copy, small["params"])
    quant = params["params"]["quant_conv"]
    quant["kernel"][:] = 0.0  # moments = bias: mean channels, then logvar channels
    quant["bias"][:] = [0.5, -0.5, 1.0, 2.0, 100.0, -100.0, 3.0, -40.0]
    frames = np.zeros((VIDEO_SHAPE[0] * VIDEO_SHAPE[1],) + VIDEO_SHAPE[2:], np.float32)
    mean, logvar = frame_fns[0](params, frames)
    np.testing.assert_array_equal(mean[0, 0, 0], [0.5, -0.5, 1.0, 2.0])
    np.testing.assert_array_equal(logvar[0, 0, 0], [20.0, -30.0, 3.0, -30.0])


def test_latents_from_posterior_scale_shift_and_sampling(small):
    vae = small["vae"]
    rng = np.random.default_rng(2)
    mean, logvar = (rng.normal(size=(2, 3, 4, 4, 4)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(latents_from_posterior(vae, mean, logvar), mean * 0.18215, rtol=1e-6)
    shifted = vae.clone(shift_factor=0.25, scaling_factor=2.0)
    np.testing.assert_allclose(
        latents_from_posterior(shifted, mean, logvar), (mean - 0.25) * 2.0, rtol=1e-6
    )
    key = jax.random.key(3)
    noise = jax.random.normal(key, mean.shape)
    sampled = latents_from_posterior(vae, mean, logvar, sample=True, rng=key)
    np.testing.assert_allclose(
        sampled, (mean + np.exp(0.5 * logvar) * noise) * 0.18215, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="rng"):
        latents_from_posterior(vae, mean, logvar, sample=True)


def test_video_helpers_fold_frames_scale_and_shard(small, frame_fns):
    """encode_video/decode_video equal independent per-frame calls (in another frame order), apply
    the scale factor, and give the same result with the batch sharded over 8 devices."""
    vae, params = small["vae"], small["params"]
    encode, decode = frame_fns
    video = np.random.default_rng(1).uniform(-1, 1, VIDEO_SHAPE).astype(np.float32)
    b, f = VIDEO_SHAPE[:2]
    # Reference: frames batched frame-major, (f b), while the helpers fold batch-major, (b f).
    mean, logvar = encode(params, einops.rearrange(video, "b f h w c -> (f b) h w c"))
    mean, logvar = (einops.rearrange(t, "(f b) h w c -> b f h w c", b=b) for t in (mean, logvar))

    def round_trip(p, v, key):  # (B, F, H, W, 3) -> sampled latents (B, F, h, w, 4) -> pixels
        latents = encode_video(vae, p, v, sample=True, rng=key)
        return latents, decode_video(vae, p["params"], latents)  # a bare tree works too

    key = jax.random.key(4)
    latents, pixels = jax.jit(round_trip)(params, video, key)
    assert latents.shape == (b, f, 8, 8, 4) and latents.dtype == jnp.float32
    noise = jax.random.normal(key, latents.shape)
    np.testing.assert_allclose(
        latents, (mean + np.exp(0.5 * logvar) * noise) * 0.18215, atol=1e-5, rtol=1e-5
    )
    expected = decode(
        params, einops.rearrange(np.asarray(latents) / 0.18215, "b f h w c -> (f b) h w c")
    )
    expected = einops.rearrange(expected, "(f b) h w c -> b f h w c", b=b)
    assert pixels.shape == video.shape and pixels.dtype == jnp.float32
    np.testing.assert_allclose(pixels, expected, atol=1e-5, rtol=1e-5)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        sharded = jax.jit(
            round_trip, in_shardings=(replicated, batch, replicated), out_shardings=(batch, batch)
        )
        got = sharded(jax.device_put(params, replicated), jax.device_put(video, batch), key)
    assert got[1].sharding.is_equivalent_to(batch, got[1].ndim)
    assert len(got[1].addressable_shards) == 8
    np.testing.assert_allclose(got[0], latents, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1], pixels, atol=1e-5, rtol=1e-5)


def test_compute_and_param_dtype_knobs(small):
    """dtype reaches every conv and matmul, param_dtype every leaf; outputs stay float32.

    Checked on the traced program: compiling bfloat16 convolutions for the CPU takes long.
    """
    vae, params = load_diffusers_vae(small["folder"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    x, z = nhwc(small["vectors"]["x"]), nhwc(small["vectors"]["z"])
    fn = lambda p, x, z: vae.apply(p, x, z, method=lambda m, x, z: (*m.encode(x), m.decode(z)))
    jaxpr = jax.make_jaxpr(fn)(params, x, z)
    heavy = _heavy_ops(jaxpr.jaxpr)
    assert len(heavy) > 20
    for eqn in heavy:
        assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn
    assert [v.dtype for v in jaxpr.out_avals] == [jnp.float32] * 3


def _heavy_ops(jaxpr):
    """conv_general_dilated and dot_general equations of a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            found.append(eqn)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found.extend(_heavy_ops(inner))
    return found


def test_imports_without_optional_stacks():
    import subprocess
    import sys

    code = (
        "import sys; import fvdm_jax.models.vae, fvdm_jax.convert.diffusers_vae; "
        "optional = ('tensorflow', 'clu', 'ml_collections', 'torch', 'diffusers', 'safetensors'); "
        "bad = [m for m in optional if m in sys.modules]; assert not bad, bad"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
