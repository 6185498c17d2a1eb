"""The Wan 2.1 VAE port against diffusers' AutoencoderKLWan, and its converter.

A tiny AutoencoderKLWan (base_dim 8, z_dim 4, the Wan 2.1 layout: dim_mult (1, 2, 4, 4), two
resnets per level, temperal_downsample (False, True, True)) gets random weights with its RMS-norm
gammas and conv biases moved away from their defaults, is saved with save_pretrained and read back
through `convert_wan_vae`; encode (diffusers' own chunking: 1 frame, then 4 at a time) and decode
(one latent frame at a time) must agree to float32 rounding. The original Wan naming is checked by
writing the same weights under the Wan repository's names (a table here, checked against
diffusers' own converter) and, for the full-size Wan 2.1 VAE, on the names and shapes alone.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

from fvdm_jax.convert.tensors import ConversionError  # noqa: E402
from fvdm_jax.convert.wan_vae import (  # noqa: E402
    convert_wan_vae,
    diffusers_to_original,
    original_to_diffusers,
    tensor_shapes,
)
from fvdm_jax.models.wan_vae import (  # noqa: E402
    WAN21_CONFIG,
    check_video_shape,
    decode_latents,
    decode_video,
    denormalize_latents,
    encode_moments,
    encode_video,
    latent_frames,
    normalize_latents,
    wan_vae_from_config,
)

TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    latents_mean=[0.3, -0.5, 0.1, 0.8],
    latents_std=[1.5, 0.7, 2.0, 1.2],
)
FRAMES, HEIGHT, WIDTH = 9, 16, 24  # 1 + 4k frames, k = 2 -> 3 latent frames of 2x3

encode_jit = jax.jit(encode_moments, static_argnums=0)
decode_jit = jax.jit(decode_latents, static_argnums=0)


def channels_last(t):
    return t.detach().permute(0, 2, 3, 4, 1).numpy()


def assert_close(got, ref, label):
    """max|got - ref| <= 1e-4 * max(1, max|ref|): float32 rounding at the reference's scale."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, (label, got.shape, ref.shape)
    err = float(np.abs(got - ref).max())
    assert err <= 1e-4 * max(1.0, float(np.abs(ref).max())), (label, err)
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoencoderKLWan(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("wan_vae") / "vae")
    model.save_pretrained(folder)
    x = torch.rand(2, 3, FRAMES, HEIGHT, WIDTH) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x).latent_dist
        decoded = model.decode(posterior.mean).sample
    params, config = convert_wan_vae(folder)
    return dict(
        model=model,
        folder=folder,
        params=params,
        config=config,
        vae=wan_vae_from_config(config),
        video=jnp.asarray(channels_last(x)),
        mean=channels_last(posterior.mean),
        logvar=channels_last(posterior.logvar),
        decoded=channels_last(decoded),
    )


def test_encode_matches_diffusers(tiny):
    mean, logvar = encode_jit(tiny["vae"], tiny["params"], tiny["video"])
    assert mean.shape == (2, latent_frames(tiny["vae"], FRAMES), HEIGHT // 8, WIDTH // 8, 4)
    assert_close(mean, tiny["mean"], "mean")
    assert_close(logvar, tiny["logvar"], "logvar")


def test_decode_matches_diffusers(tiny):
    assert np.mean(np.abs(tiny["decoded"]) < 0.999) > 0.9  # the [-1, 1] clamp hides little
    pixels = decode_jit(tiny["vae"], tiny["params"], jnp.asarray(tiny["mean"]))
    assert pixels.shape == (2, FRAMES, HEIGHT, WIDTH, 3)
    assert_close(pixels, tiny["decoded"], "decode")


def test_causal_chunks(tiny):
    """Fewer frames give the same leading latents, fewer latents the same leading frames."""
    vae, params = tiny["vae"], tiny["params"]
    for frames in (1, 5):
        mean, _ = encode_jit(vae, params, tiny["video"][:, :frames])
        assert_close(mean, tiny["mean"][:, : latent_frames(vae, frames)], f"encode {frames}")
    pixels = decode_jit(vae, params, jnp.asarray(tiny["mean"][:, :2]))
    assert_close(pixels, tiny["decoded"][:, :5], "decode 2 latent frames")


def test_normalised_latents(tiny):
    vae, params = tiny["vae"], tiny["params"]
    inv_std = 1.0 / torch.tensor(TINY["latents_std"])  # the Wan pipelines' arithmetic
    ref = ((torch.from_numpy(tiny["mean"]) - torch.tensor(TINY["latents_mean"])) * inv_std).numpy()
    assert_close(normalize_latents(vae, tiny["mean"]), ref, "normalize_latents")
    assert_close(denormalize_latents(vae, ref), tiny["mean"], "denormalize_latents")
    rng = jax.random.key(3)
    encode = jax.jit(lambda video: encode_video(vae, params, video, sample=True, rng=rng))
    sampled = encode(tiny["video"])
    noise = np.asarray(jax.random.normal(rng, sampled.shape)) * np.exp(0.5 * tiny["logvar"])
    assert_close(sampled, ref + noise * inv_std.numpy(), "sampled latents")
    pixels = jax.jit(decode_video, static_argnums=0)(vae, params, jnp.asarray(ref))
    assert_close(pixels, tiny["decoded"], "decode_video")
    with pytest.raises(ValueError, match="rng"):
        encode_video(vae, params, tiny["video"], sample=True)


# --- the original Wan names -----------------------------------------------------------------------

# diffusers name -> original Wan name, for num_res_blocks = 2 (3 resnets + 1 resampler per decoder
# level in the original's flat `decoder.upsamples`).
RESNET_RENAMES = [(r"\.norm1\.", ".residual.0."), (r"\.conv1\.", ".residual.2."),
                  (r"\.norm2\.", ".residual.3."), (r"\.conv2\.", ".residual.6."),
                  (r"\.conv_shortcut\.", ".shortcut.")]
MODULE_RENAMES = [(r"^quant_conv\.", "conv1."), (r"^post_quant_conv\.", "conv2."),
                  (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
                  (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
                  (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
                  (r"\.mid_block\.resnets\.0\.", ".middle.0."),
                  (r"\.mid_block\.attentions\.0\.", ".middle.1."),
                  (r"\.mid_block\.resnets\.1\.", ".middle.2."),
                  (r"^encoder\.down_blocks\.", "encoder.downsamples.")]


def to_original(name):
    if re.search(r"\.(down_blocks|up_blocks|mid_block\.resnets)\.", name):
        for pattern, new in RESNET_RENAMES:
            name = re.sub(pattern, new, name)
    for pattern, new in MODULE_RENAMES:
        name = re.sub(pattern, new, name)
    name = re.sub(r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.",
                  lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.", name)
    return re.sub(r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.",
                  lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.", name)


def original_state_dict(model):
    sd = {to_original(k): v for k, v in model.state_dict().items()}
    assert set(convert_wan_vae_to_diffusers(sd)) == set(model.state_dict())  # the table is right
    return sd


def assert_same_params(a, b):
    flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        np.testing.assert_array_equal(value, flat_b[key], err_msg=str(key))


def test_original_names_load_the_same_params(tiny, tmp_path):
    sd = original_state_dict(tiny["model"])
    path = str(tmp_path / "Wan2.1_VAE.pth")
    torch.save(sd, path)
    params, _ = convert_wan_vae(path, config=tiny["config"])
    assert_same_params(params, tiny["params"])
    with pytest.raises(ConversionError, match="tensors"):  # no config: Wan 2.1's shapes differ
        convert_wan_vae(path)
    with open(tmp_path / "config.json", "w") as f:  # a folder: its config.json and .pth
        json.dump(tiny["config"], f)
    assert_same_params(convert_wan_vae(str(tmp_path))[0], tiny["params"])


def test_sharded_diffusers_folder(tiny, tmp_path):
    tiny["model"].save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert any(n.endswith(".index.json") for n in os.listdir(tmp_path))
    params, _ = convert_wan_vae(str(tmp_path))
    assert_same_params(params, tiny["params"])


def test_missing_and_extra_keys_are_one_line(tiny, tmp_path):
    sd = original_state_dict(tiny["model"])
    cases = {"missing": {k: v for k, v in sd.items() if k != "decoder.upsamples.4.shortcut.bias"},
             "extra": {**sd, "encoder.bogus.weight": torch.zeros(3)}}
    for label, state in cases.items():
        path = str(tmp_path / f"{label}.pth")
        torch.save(state, path)
        with pytest.raises(ConversionError) as error:
            convert_wan_vae(path, config=tiny["config"])
        message = str(error.value)
        assert "\n" not in message
        assert ("decoder.upsamples.4.shortcut.bias" if label == "missing" else "encoder.bogus.weight") in message
    wrong = {**sd, "conv2.weight": torch.zeros(4, 4, 1, 1, 2)}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ConversionError, match=r"conv2\.weight \(4, 4, 1, 1, 2\)"):
        convert_wan_vae(str(tmp_path / "wrong.pth"), config=tiny["config"])


def test_full_size_wan21_names_and_shapes():
    with torch.device("meta"):
        model = AutoencoderKLWan()  # diffusers' defaults are the Wan 2.1 VAE
    ours = wan_vae_from_config(dict(model.config))
    assert ours == wan_vae_from_config(WAN21_CONFIG)
    assert (ours.spatial_factor, ours.temporal_factor) == (8, 4)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert tensor_shapes(ours) == expected
    originals = {to_original(k): v for k, v in model.state_dict().items()}
    assert set(convert_wan_vae_to_diffusers(originals)) == set(expected)
    assert {original_to_diffusers(k, WAN21_CONFIG) for k in originals} == set(expected)
    assert {diffusers_to_original(k, WAN21_CONFIG) for k in expected} == set(originals)


def test_bad_inputs_are_one_line_errors(tiny):
    vae = tiny["vae"]
    for shape, words in (((1, 8, 16, 16, 3), "frames"), ((1, 9, 16, 16, 4), "channels-last"),
                         ((1, 9, 12, 16, 3), "multiples of 8"), ((9, 16, 16, 3), "channels-last")):
        with pytest.raises(ValueError, match=words) as error:
            check_video_shape(vae, shape)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="frames"):
        encode_moments(vae, tiny["params"], jnp.zeros((1, 6, 16, 16, 3)))
    with pytest.raises(ValueError, match="latents"):
        decode_latents(vae, tiny["params"], jnp.zeros((1, 2, 2, 2, 3)))


def test_wan22_and_unknown_configs_are_rejected(tiny, tmp_path):
    for extra, words in (({"is_residual": True}, "Wan 2.2"), ({"patch_size": 2}, "Wan 2.2"),
                         ({"attn_scales": [0.5]}, "attn_scales"), ({"mystery": 1}, "mystery"),
                         ({"temperal_downsample": [True]}, "temperal_downsample")):
        with pytest.raises(ValueError, match=words):
            wan_vae_from_config({**tiny["config"], **extra})
    folder = tmp_path / "wan22"
    tiny["model"].save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "is_residual": True}))
    with pytest.raises(ConversionError, match="Wan 2.2") as error:
        convert_wan_vae(str(folder))
    assert "\n" not in str(error.value)
