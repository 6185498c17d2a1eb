"""The UMT5 text encoder (fvdm_jax/models/umt5.py), its converter (fvdm_jax/convert/umt5.py) and
the prompt tokenizer (fvdm_jax/data/tokenizer.py), against transformers on a tiny random
UMT5EncoderModel and a sentencepiece model trained here (T5's special ids: pad 0, EOS 1, unk 2).

Hidden states are compared at every position, padded ones included: transformers, Wan and the
model here all compute a padded query position like the others (it attends to the real tokens),
so those rows agree as well."""

import io
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

from fvdm_jax.convert.tensors import ConversionError, read_safetensors, write_safetensors  # noqa: E402
from fvdm_jax.convert.umt5 import convert_umt5  # noqa: E402
from fvdm_jax.data.tokenizer import UMT5Tokenizer, clean_prompt  # noqa: E402
from fvdm_jax.errors import ConfigError  # noqa: E402
from fvdm_jax.models.umt5 import relative_position_buckets, umt5_from_config  # noqa: E402

SENTENCES = [
    "A cat sits on the mat.", "The quick brown fox jumps over the lazy dog.",
    "Video diffusion models generate frames.", "A red car drives along a mountain road at sunset.",
    "Two dogs play in the snow, café, naïve résumé!", "Ocean waves crash against the rocks 123.",
]
# Prompts of different lengths (padding, truncation at 16), odd whitespace, characters outside
# the vocabulary, special tokens written out, T5 sentinels, an empty prompt.
PROMPTS = [
    "A cat sits on the mat.", "  a   dog  runs   ", "Zebra xylophone QQQ", "", "café naïve",
    "hello\tworld\nnew", "A cat </s> mat", "a <unk> b", "x <extra_id_1> y", "<pad>",
    "The quick brown fox jumps over the lazy dog. " * 2,
]
TINY = dict(d_model=32, d_ff=48, num_heads=4, d_kv=8, num_layers=3, relative_attention_num_buckets=8,
            relative_attention_max_distance=16)
VOCAB = 80
LENGTH = 16

# Wan's T5Encoder names (Wan-Video/Wan2.1 wan/modules/t5.py: T5Encoder with shared_pos=False,
# T5SelfAttention blocks norm1 / attn / norm2 / ffn (gate = GELU branch, fc1, fc2) / pos_embedding).
WAN_BLOCK = {
    "layer.0.layer_norm": "norm1",
    "layer.0.SelfAttention.q": "attn.q",
    "layer.0.SelfAttention.k": "attn.k",
    "layer.0.SelfAttention.v": "attn.v",
    "layer.0.SelfAttention.o": "attn.o",
    "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "layer.1.layer_norm": "norm2",
    "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
    "layer.1.DenseReluDense.wi_1": "ffn.fc1",
    "layer.1.DenseReluDense.wo": "ffn.fc2",
}


def wan_name(key: str) -> str:
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    _, _, index, rest = key.split(".", 3)  # encoder.block.N.<module>.weight
    return f"blocks.{index}.{WAN_BLOCK[rest.removesuffix('.weight')]}.weight"


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A folder with spiece.model: a unigram model trained on SENTENCES with T5's special ids."""
    folder = tmp_path_factory.mktemp("spm")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=model, vocab_size=VOCAB,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


def tiny_model(seed: int, **overrides):
    """A random UMT5EncoderModel of TINY's sizes, its norm scales drawn from [0.5, 1.5)."""
    torch.manual_seed(seed)
    config = transformers.UMT5Config(vocab_size=VOCAB, **{**TINY, **overrides})
    model = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch UMT5EncoderModel, its save_pretrained folder), norms perturbed away from 1."""
    model = tiny_model(seed=0)
    folder = tmp_path_factory.mktemp("umt5") / "encoder"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def converted(reference):
    params, config = convert_umt5(str(reference[1]))
    return params, config


def torch_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
                    attention_mask=torch.as_tensor(np.asarray(mask), dtype=torch.long))
    return out.last_hidden_state.float().numpy()


def batch():
    """ids (3, 16) with 16, 10 and 3 real tokens, padding 0 after them."""
    ids = np.random.default_rng(0).integers(3, VOCAB, (3, LENGTH)).astype(np.int32)
    mask = np.zeros((3, LENGTH), np.int32)
    for row, n in enumerate((LENGTH, 10, 3)):
        mask[row, :n] = 1
    return np.where(mask == 1, ids, 0), mask


def test_relative_position_buckets_match_transformers():
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    for buckets, distance, length in ((32, 128, 600), (8, 16, 40)):
        config = transformers.UMT5Config(d_model=8, num_heads=2, d_kv=4, relative_attention_num_buckets=buckets,
                                         relative_attention_max_distance=distance)
        attention = UMT5Attention(config, has_relative_attention_bias=True)
        relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        expected = attention._relative_position_bucket(relative).numpy()
        np.testing.assert_array_equal(relative_position_buckets(length, length, buckets, distance),
                                      expected)


def test_converted_encoder_matches_transformers(reference, converted):
    model, _ = reference
    params, config = converted
    assert {k: config[k] for k in TINY} == TINY and config["vocab_size"] == VOCAB
    assert config["param_dtype"] == "float32"
    encoder = umt5_from_config(config)
    assert encoder.activation == "gelu_new" and encoder.gated
    # The converted tree is the model's own (names and shapes), each block with its position bias.
    abstract = nn.meta.unbox(jax.eval_shape(encoder.init, jax.random.key(0),
                                            jnp.zeros((1, 4), jnp.int32)))
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(np.shape, abstract)
    assert params["params"]["encoder"]["block_2"]["layer_0"]["SelfAttention"][
        "relative_attention_bias"].shape == (8, 4)
    ids, mask = batch()
    expected = torch_hidden(model, ids, mask)
    out = np.asarray(jax.jit(encoder.apply)(params, ids, mask))
    assert out.shape == (3, LENGTH, 32) and out.dtype == np.float32
    error = np.abs(out - expected).max()
    print(f"UMT5 tiny encoder vs transformers (all positions): max abs error {error:.2e}, "
          f"output std {expected.std():.2f}")
    assert error < 2e-5
    # Padded keys get no attention: changing the ids behind the mask changes nothing before it.
    noisy = np.where(mask == 1, ids, 7)
    again = np.asarray(jax.jit(encoder.apply)(params, noisy, mask))
    real = mask == 1
    np.testing.assert_allclose(again[real], out[real], atol=1e-6)

    bf16 = np.asarray(jax.jit(umt5_from_config(config, dtype="bfloat16").apply)(params, ids, mask))
    bf16_error = np.abs(bf16 - expected).max()
    print(f"bfloat16 matmuls: max abs error {bf16_error:.2e}")
    assert bf16_error < 0.1


def test_tokenizer_matches_transformers(spm_folder):
    reference = transformers.T5Tokenizer.from_pretrained(str(spm_folder))
    ours = UMT5Tokenizer(str(spm_folder), max_length=LENGTH, clean=False)
    assert (ours.pad_id, ours.eos_id) == (reference.pad_token_id, reference.eos_token_id) == (0, 1)
    assert ours.vocab_size == len(reference)  # the pieces and 100 sentinels
    for prompt in PROMPTS:
        assert ours.encode(prompt) == reference(prompt)["input_ids"], prompt
    ids, mask = ours(PROMPTS)
    expected = reference(PROMPTS, padding="max_length", max_length=LENGTH, truncation=True)
    np.testing.assert_array_equal(ids, np.array(expected["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(expected["attention_mask"]))
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(PROMPTS), LENGTH)
    lengths = mask.sum(1)
    rows = np.arange(len(PROMPTS))
    assert (ids[rows, lengths - 1] == 1).all()  # EOS closes every prompt, truncated ones too
    assert (ids[mask == 0] == 0).all() and lengths.max() == LENGTH and lengths[3] == 1
    # Wan's cleaning: HTML entities and whitespace runs.
    assert clean_prompt("  A&amp;amp;B \n\t cat ") == "A&B cat"
    assert UMT5Tokenizer(str(spm_folder / "spiece.model")).encode("  A&amp;B \n cat ") == \
        reference("A&B cat")["input_ids"]


def test_prompt_to_hidden_states_matches_transformers(spm_folder, reference, converted):
    model, _ = reference
    params, config = converted
    prompts = ["A red car drives at sunset.", "Two dogs play in the snow, café!", "Ocean"]
    ids, mask = UMT5Tokenizer(str(spm_folder), max_length=LENGTH)(prompts)
    assert ids.max() < VOCAB
    tokens = transformers.T5Tokenizer.from_pretrained(str(spm_folder))(
        prompts, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
    expected = torch_hidden(model, tokens["input_ids"], tokens["attention_mask"])
    out = np.asarray(jax.jit(umt5_from_config(config).apply)(params, ids, mask))
    error = np.abs(out - expected).max()
    print(f"prompt -> hidden states vs transformers: max abs error {error:.2e}")
    assert error < 2e-5


def test_wan_pth_and_bf16(tmp_path):
    """Wan's original names in a bf16 .pth (as models_t5_umt5-xxl-enc-bf16.pth, next to the DiT's
    config.json): the sizes come from the tensors with Wan's max distance 128, bf16 stays bf16, and
    the output is the float32 transformers model's on the same bf16-rounded weights."""
    model = tiny_model(seed=1, relative_attention_num_buckets=32, relative_attention_max_distance=128)
    state = {wan_name(k): v.to(torch.bfloat16) for k, v in model.state_dict().items()
             if k != "encoder.embed_tokens.weight"}
    assert "blocks.1.ffn.gate.0.weight" in state and "blocks.0.pos_embedding.embedding.weight" in state
    torch.save(state, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    (tmp_path / "config.json").write_text(json.dumps({"dim": 1536, "num_heads": 12, "num_layers": 30}))
    params, config = convert_umt5(str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"))
    assert {k: config[k] for k in TINY} == {**TINY, "relative_attention_num_buckets": 32,
                                            "relative_attention_max_distance": 128}
    assert config["param_dtype"] == "bfloat16"
    leaves = jax.tree_util.tree_leaves(params)
    assert {leaf.dtype for leaf in leaves} == {np.dtype(ml_dtypes.bfloat16)}
    rounded = transformers.UMT5EncoderModel(model.config).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    ids, mask = batch()
    expected = torch_hidden(rounded, ids, mask)
    out = np.asarray(jax.jit(umt5_from_config(config).apply)(params, ids, mask))
    error = np.abs(out - expected).max()
    print(f"Wan bf16 .pth vs transformers on the same bf16 weights: max abs error {error:.2e}")
    assert error < 2e-5


def test_sharded_encoder_decoder_folder(reference, converted, tmp_path):
    """A UMT5ForConditionalGeneration folder in shards: the decoder and lm_head are skipped and
    the encoder's parameters are the encoder model's."""
    model, _ = reference
    full = transformers.UMT5ForConditionalGeneration(model.config)
    full.encoder.load_state_dict(model.encoder.state_dict())
    full.shared.load_state_dict(model.shared.state_dict())
    full.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    params, config = convert_umt5(str(tmp_path))
    assert config == converted[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, converted[0])


def test_missing_or_extra_tensor_is_one_line(reference, tmp_path):
    _, folder = reference
    sd = read_safetensors(str(folder / "model.safetensors"))
    config = (folder / "config.json").read_text()
    for name, change in (("missing", lambda d: d.pop("encoder.block.1.layer.1.DenseReluDense.wi_1.weight")),
                         ("extra", lambda d: d.update({"encoder.block.1.extra.weight": np.zeros(2, np.float32)}))):
        broken = dict(sd)
        change(broken)
        (tmp_path / name).mkdir()
        write_safetensors(str(tmp_path / name / "model.safetensors"), broken)
        (tmp_path / name / "config.json").write_text(config)
        with pytest.raises(ConversionError) as info:
            convert_umt5(str(tmp_path / name))
        message = str(info.value)
        assert "\n" not in message
        assert ("wi_1" if name == "missing" else "encoder.block.1.extra.weight") in message
    wan = {wan_name(k): v for k, v in sd.items()}
    del wan["blocks.2.attn.o.weight"]
    torch.save({k: torch.from_numpy(v) for k, v in wan.items()}, tmp_path / "wan.pth")
    with pytest.raises(ConversionError, match=r"blocks\.2\.attn\.o\.weight") as info:
        convert_umt5(str(tmp_path / "wan.pth"))
    assert "\n" not in str(info.value)
    with pytest.raises(ConversionError, match="does not exist"):
        convert_umt5(str(tmp_path / "nowhere"))
    (tmp_path / "sizes").mkdir()
    (tmp_path / "sizes" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "sizes" / "config.json").write_text(json.dumps({**json.loads(config), "d_ff": 64}))
    with pytest.raises(ConversionError, match="do not fit") as info:
        convert_umt5(str(tmp_path / "sizes"))
    assert "\n" not in str(info.value)


def test_missing_tokenizer_is_one_line(tmp_path):
    for path in (tmp_path / "absent.model", tmp_path):
        with pytest.raises(ConfigError) as info:
            UMT5Tokenizer(str(path))
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "spiece.model" in message


def test_config_and_inputs():
    with pytest.raises(ValueError, match="d_ff"):
        umt5_from_config({"d_model": 8, "d_kv": 4, "num_heads": 2, "num_layers": 1, "vocab_size": 9})
    encoder = umt5_from_config({**TINY, "vocab_size": 9, "dropout_rate": 0.1, "dtype": "bfloat16"})
    assert encoder.dtype == jnp.float32 and encoder.num_layers == 3
    assert not umt5_from_config({**TINY, "vocab_size": 9, "feed_forward_proj": "relu"}).gated
