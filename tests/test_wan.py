"""The Wan 2.1 T2V DiT (fvdm_jax/models/wan.py) against diffusers' WanTransformer3DModel.

A tiny random diffusers model (2 heads of width 12, so the 3-D RoPE splits each head into t/h/w
parts of 4 channels) is saved with save_pretrained, converted by the CLI's function, read back by
the inference-checkpoint reader and built by models.model_from_config; its outputs must equal
diffusers' to float32 rounding. Per-frame timesteps are fed to diffusers as its per-token timestep
(Wan 2.2 TI2V path): each frame's t repeated over the frame's h*w tokens.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fvdm_jax.checkpoint.inference import load_inference_checkpoint  # noqa: E402
from fvdm_jax.convert.__main__ import convert_wan  # noqa: E402
from fvdm_jax.models import Wan, model_from_config, wan_model_config  # noqa: E402
from fvdm_jax.models.wan import rope_split, wan_from_config  # noqa: E402

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
# Relative to the largest output magnitude: float32 rounding, not a loose match.
TOLERANCE = 2e-5


def tiny_diffusers(seed: int = 0, **overrides):
    """A tiny WanTransformer3DModel with every parameter random (scale-shift tables included)."""
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**(TINY | overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(diffusers model, our model, params as the inference-checkpoint reader returns them)."""
    root = tmp_path_factory.mktemp("wan")
    reference = tiny_diffusers()
    reference.save_pretrained(root / "diffusers")  # safetensors
    convert_wan(str(root / "diffusers"), str(root / "converted"))
    params, config = load_inference_checkpoint(str(root / "converted"))
    assert config["diffusion"] == {"process": "flow", "num_train_timesteps": 1000, "shift": 5.0}
    model = model_from_config(config["model"])
    assert isinstance(model, Wan)
    return reference, model, params


def run_both(converted, frames, height, width, timesteps, context):
    """diffusers (B, C, F, H, W) vs ours (B, F, H, W, C) on the same random latents."""
    reference, model, params = converted
    batch = context.shape[0]
    x = torch.randn(batch, 4, frames, height, width, generator=torch.Generator().manual_seed(1))
    t = torch.as_tensor(timesteps, dtype=torch.float32)
    if t.ndim == 2:  # per frame -> per token, the frame's t over its (H/2)*(W/2) tokens
        theirs_t = t[:, :, None].expand(batch, frames, (height // 2) * (width // 2)).reshape(batch, -1)
    else:
        theirs_t = t
    with torch.no_grad():
        expected = reference(x, theirs_t, context).sample.numpy()
    ours = model.apply(params, jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)),
                       jnp.asarray(t.numpy()), jnp.asarray(context.numpy()))
    assert ours.dtype == jnp.float32
    return np.asarray(ours).transpose(0, 4, 1, 2, 3), expected


def assert_close(ours, expected):
    assert ours.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(ours - expected).max())
    assert err <= TOLERANCE * scale, (err, scale)


def text(batch, length, seed=2):
    return torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(seed))


def test_rope_split_is_not_trivial():
    assert rope_split(12) == (4, 4, 4)
    assert rope_split(128) == (44, 42, 42)


def test_scalar_timestep_matches_diffusers(converted):
    ours, expected = run_both(converted, 2, 4, 4, [10.0, 700.0], text(2, 5))
    assert_close(ours, expected)


def test_per_frame_timesteps_match_diffusers_per_token_timesteps(converted):
    t = [[100.0, 500.0, 900.0], [3.0, 999.0, 250.5]]
    ours, expected = run_both(converted, 3, 4, 6, t, text(2, 5))
    assert_close(ours, expected)
    # And the frames really differ from a shared timestep.
    shared, _ = run_both(converted, 3, 4, 6, [[500.0] * 3, [500.0] * 3], text(2, 5))
    assert np.abs(shared - ours).max() > 1e-2


def test_zero_padded_text_matches_diffusers_and_the_mask_drops_the_padding(converted):
    context = text(1, 6)
    context[:, 4:] = 0  # Wan pads prompts with zeros and attends to all tokens
    ours, expected = run_both(converted, 2, 4, 4, [[300.0, 600.0]], context)
    assert_close(ours, expected)
    # A context_mask over the padding gives diffusers' output on the unpadded tokens only.
    reference, model, params = converted
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x, torch.tensor([300.0]), context[:, :4]).sample.numpy()
    mask = jnp.asarray([[True] * 4 + [False] * 2])
    masked = model.apply(params, jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)),
                         jnp.asarray([300.0]), jnp.asarray(context.numpy()), mask)
    assert_close(np.asarray(masked).transpose(0, 4, 1, 2, 3), expected)


def test_odd_frames_and_non_square_latents_match_diffusers(converted):
    ours, expected = run_both(converted, 3, 6, 4, [[0.0, 421.0, 1000.0]], text(1, 3))
    assert_close(ours, expected)


def test_scan_unroll_and_remat_give_the_same_output(converted):
    _, model, params = converted
    x = jax.random.normal(jax.random.key(0), (1, 2, 4, 4, 4))
    t, ctx = jnp.asarray([[250.0, 750.0]]), jax.random.normal(jax.random.key(1), (1, 3, 16))
    base = model.apply(params, x, t, ctx)
    for variant in (model.clone(scan_layers=False), model.clone(remat="full"),
                    model.clone(remat="dots")):
        np.testing.assert_allclose(variant.apply(params, x, t, ctx), base, rtol=0, atol=1e-5)


def test_bad_inputs_and_image_models_are_refused(converted):
    _, model, params = converted
    x, ctx = jnp.zeros((1, 2, 4, 4, 4)), jnp.zeros((1, 3, 16))
    with pytest.raises(ValueError, match="timesteps have shape"):
        model.apply(params, x, jnp.zeros((1, 3)), ctx)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        model.apply(params, jnp.zeros((1, 2, 5, 4, 4)), jnp.zeros((1,)), ctx)
    with pytest.raises(ValueError, match="text_dim"):
        model.apply(params, x, jnp.zeros((1,)), jnp.zeros((1, 3, 8)))
    with pytest.raises(ValueError, match="image-to-video"):
        wan_from_config(wan_model_config("tiny", image_dim=1280))


def test_init_has_logical_names_and_keeps_bf16_weights():
    model = wan_from_config(wan_model_config("tiny", param_dtype="bfloat16", dtype="bfloat16"))
    x, t, ctx = jnp.zeros((1, 1, 4, 4, 4)), jnp.zeros((1,)), jnp.zeros((1, 2, 16))
    boxed = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"]
    spec = tuple(nn.get_partition_spec(boxed["blocks"]["self_attn"]["q"]["kernel"]))
    assert spec == ("layers", "embed", "heads", "kv")
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda b: b.unbox() if hasattr(b, "unbox") else b, boxed,
        is_leaf=lambda b: hasattr(b, "unbox")))
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("size", ["1.3B", "14B"])
def test_parameter_count_equals_diffusers(size):
    config = wan_model_config(size)
    with torch.device("meta"):
        reference = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=config["num_heads"],
            attention_head_dim=config["dim"] // config["num_heads"], in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=config["ffn_dim"],
            num_layers=config["num_layers"])
    theirs = sum(p.numel() for p in reference.parameters())
    model = wan_from_config(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1, 2, 2, 16)),
                            jnp.zeros((1,)), jnp.zeros((1, 1, 4096)))
    ours = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))
    assert ours == theirs
    assert theirs == {"1.3B": 1_418_996_800, "14B": 14_288_491_584}[size]
