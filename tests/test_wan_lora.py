"""LoRA on Wan (fvdm_jax/models/lora.py, fvdm_jax/convert/wan_lora.py) against peft.

A tiny random diffusers WanTransformer3DModel gets peft adapters on Pusa's targets (q, k, v, o of
both attentions and both FFN linears) with random A and B; the LoRA file peft writes loads into
our model as adapters and gives diffusers' output to float32 rounding; folded into the kernels
(`merge`: W + alpha / r A B) the plain model gives the same; Wan's original (Kijai) names that
Pusa's tooling reads round-trip; a fresh adapter changes nothing; bad files are one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

from fvdm_jax.checkpoint.inference import load_inference_checkpoint  # noqa: E402
from fvdm_jax.convert.__main__ import convert_wan  # noqa: E402
from fvdm_jax.convert.tensors import ConversionError  # noqa: E402
from fvdm_jax.convert.wan_lora import (  # noqa: E402
    adapter_state_dict,
    adapters_from_state_dict,
    read_lora_file,
    with_adapters,
)
from fvdm_jax.models import model_from_config  # noqa: E402
from fvdm_jax.models.lora import WAN_TARGETS, LoRA, is_adapter, merge  # noqa: E402

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
SIZES = dict(num_layers=2, dim=24, num_heads=2, ffn_dim=32)
RANK, ALPHA = 4, 8.0
CONVERTED = {}  # the converted base checkpoint's folder, once the fixture made it
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_lora")
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    reference.save_pretrained(root / "base")
    convert_wan(str(root / "base"), str(root / "converted"))
    CONVERTED["path"] = str(root / "converted")  # for the sampling test
    params, config = load_inference_checkpoint(str(root / "converted"))
    reference.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    state = peft.utils.get_peft_model_state_dict(reference)
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "lora.safetensors"))
    return reference, params, config["model"], str(root / "lora.safetensors")


def inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 6, 4)).astype(np.float32)  # (B, F, H, W, C)
    t = np.asarray([[10.0, 500.0, 990.0], [250.0, 250.0, 250.0]], np.float32)
    context = rng.standard_normal((2, 5, 16)).astype(np.float32)
    return x, t, context


def reference_output(reference, x, t, context):
    tokens = (x.shape[2] // 2) * (x.shape[3] // 2)
    per_token = torch.as_tensor(np.repeat(t, tokens, axis=1))
    with torch.no_grad():
        out = reference(torch.as_tensor(x.transpose(0, 4, 1, 2, 3)), per_token,
                        torch.as_tensor(context)).sample.numpy()
    return out.transpose(0, 2, 3, 4, 1)


def assert_close(ours, expected):
    scale = max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(np.asarray(ours) - expected).max()) <= 2e-5 * scale


def test_peft_lora_loads_and_gives_diffusers_output(setup):
    reference, params, model_config, path = setup
    adapters, rank, alpha, targets = adapters_from_state_dict(read_lora_file(path), **SIZES)
    assert (rank, alpha, targets) == (RANK, None, WAN_TARGETS)  # peft keeps alpha elsewhere
    model = model_from_config(dict(model_config, lora_rank=rank, lora_alpha=ALPHA,
                                   lora_targets=targets))
    full = with_adapters(params, adapters)
    # The tree the model makes is the tree the file fills.
    shapes = jax.eval_shape(model.init, jax.random.key(0), *map(jnp.asarray, inputs()))
    assert jax.tree_util.tree_structure(nn_unbox(shapes)) == jax.tree_util.tree_structure(full)
    x, t, context = inputs()
    expected = reference_output(reference, x, t, context)
    assert_close(model.apply(full, x, t, context), expected)
    # Folded into the kernels, the plain model gives the same.
    plain = model_from_config(model_config)
    merged = merge(full, LoRA(rank, ALPHA))
    assert not any(is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(merged))
    assert_close(plain.apply(merged, x, t, context), expected)
    # And differs from the base model: the adapters do something.
    assert np.abs(np.asarray(plain.apply(params, x, t, context)) - expected).max() > 1e-2


def test_original_names_round_trip(setup, tmp_path):
    _, params, _, path = setup
    adapters, rank, _, targets = adapters_from_state_dict(read_lora_file(path), **SIZES)
    written = adapter_state_dict(with_adapters(params, adapters), alpha=ALPHA)
    assert "diffusion_model.blocks.1.ffn.2.lora_up.weight" in written
    assert written["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape == (RANK, 24)
    save_file({k: torch.as_tensor(v) for k, v in written.items()}, str(tmp_path / "kijai.safetensors"))
    again, rank2, alpha, targets2 = adapters_from_state_dict(
        read_lora_file(str(tmp_path / "kijai.safetensors")), **SIZES)
    assert (rank2, alpha, targets2) == (rank, ALPHA, targets)
    for a, b in zip(jax.tree_util.tree_leaves(adapters), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_a_fresh_adapter_changes_nothing(setup):
    _, params, model_config, _ = setup
    model = model_from_config(dict(model_config, lora_rank=RANK))
    x, t, context = inputs()
    fresh = nn_unbox(model.init(jax.random.key(3), x, t, context))
    ups = [leaf for p, leaf in jax.tree_util.tree_leaves_with_path(fresh) if "lora_up" in str(p)]
    assert len(ups) == len(WAN_TARGETS) and not any(np.asarray(u).any() for u in ups)
    downs = [leaf for p, leaf in jax.tree_util.tree_leaves_with_path(fresh) if "lora_down" in str(p)]
    assert all(np.asarray(d).std() > 0 for d in downs)
    blocks = fresh["params"]["blocks"]
    adapters = {"blocks": {m: {layer: {k: v for k, v in leaves.items() if k.startswith("lora_")}
                               for layer, leaves in blocks[m].items() if "lora_up" in leaves}
                           for m in ("self_attn", "cross_attn", "ffn")}}
    full = with_adapters(params, jax.tree_util.tree_map(np.asarray, adapters))
    plain = model_from_config(model_config)
    np.testing.assert_allclose(model.apply(full, x, t, context), plain.apply(params, x, t, context),
                               atol=1e-5)


def test_bad_lora_files_are_one_line(setup):
    _, _, _, path = setup
    sd = read_lora_file(path)
    extra = dict(sd, **{"blocks.0.norm3.lora_A.weight": np.zeros((4, 24), np.float32)})
    missing = {k: v for k, v in sd.items() if "blocks.1.attn1.to_q" not in k}
    for bad, message in ((extra, "no Wan adapter takes"), (missing, "lacks blocks.1.self_attn.q"),
                         ({}, "holds no Wan adapter")):
        with pytest.raises(ConversionError, match=message) as error:
            adapters_from_state_dict(bad, **SIZES)
        assert "\n" not in str(error.value)
    with pytest.raises(ConversionError, match="ffn.fc1 is 24 -> 32 wide but the model's layer is 24 -> 48"):
        adapters_from_state_dict(sd, **dict(SIZES, ffn_dim=48))
    with pytest.raises(ValueError, match="lora.targets has"):
        LoRA(rank=4, targets=("self_attn.x",))


def nn_unbox(tree):
    import flax.linen as nn

    return nn.unbox(tree)


def test_sampling_merges_a_lora_file_at_a_strength(setup):
    """sample.checkpoint (a plain converted Wan) + lora.init_from (a LoRA file) + lora.strength:
    the sampler's weights are W + strength * alpha / r A B."""
    import os

    from fvdm_jax.config.load import load_config
    from fvdm_jax.sampling.weights import load_sampling_params

    _, params, model_config, path = setup
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "wan_tiny.py"))
    config.sample.checkpoint = CONVERTED["path"]
    config.lora.init_from, config.lora.alpha, config.lora.strength = path, ALPHA, 1.4
    _, _, merged = load_sampling_params(config, "/nonexistent")
    adapters, *_ = adapters_from_state_dict(read_lora_file(path), **SIZES)
    down = adapters["blocks"]["ffn"]["fc1"]["lora_down"]  # (L, D, r)
    up = adapters["blocks"]["ffn"]["fc1"]["lora_up"]  # (L, r, F)
    kernel = np.asarray(params["params"]["blocks"]["ffn"]["fc1"]["kernel"])
    want = kernel + 1.4 * ALPHA / RANK * np.einsum("ldr,lrf->ldf", down, up)
    np.testing.assert_allclose(np.asarray(merged["params"]["blocks"]["ffn"]["fc1"]["kernel"]), want,
                               rtol=1e-5, atol=1e-5)
