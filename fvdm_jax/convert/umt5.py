"""UMT5 text-encoder weights (Wan 2.1's UMT5-XXL encoder) -> `fvdm_jax.models.umt5` parameters.

Two namings are read:

  transformers  `UMT5EncoderModel` (also the encoder half of a `UMT5ForConditionalGeneration` /
                `UMT5Model` folder, whose `decoder.*` and `lm_head.*` tensors are skipped):
                `shared.weight` (or `encoder.embed_tokens.weight`),
                `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight`,
                `encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight`,
                `encoder.block.N.layer.{0,1}.layer_norm.weight`,
                `encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`,
                `encoder.final_layer_norm.weight`
  original Wan  Wan-Video/Wan2.1 wan/modules/t5.py `T5Encoder` (the release file
                `models_t5_umt5-xxl-enc-bf16.pth`): `token_embedding.weight`,
                `blocks.N.norm1.weight`, `blocks.N.attn.{q,k,v,o}.weight`,
                `blocks.N.pos_embedding.embedding.weight`, `blocks.N.norm2.weight`,
                `blocks.N.ffn.gate.0.weight` (= wi_0, the GELU branch), `blocks.N.ffn.fc1.weight`
                (= wi_1), `blocks.N.ffn.fc2.weight` (= wo), `norm.weight`

Files: a folder with config.json and model.safetensors, or shards named by a
`*.safetensors.index.json` (or pytorch_model*.bin with their index; torch files need torch); a
diffusers pipeline folder is read from its text_encoder/ subfolder; or one weights file
(.safetensors, .pth/.pt/.bin/.ckpt). Without a config.json the sizes come from the tensors (the
head count from the relative-position table); relative_attention_max_distance is then 128 and
the FFN is gated GELU(tanh), as in UMT5-XXL and Wan. Torch Linear weights (out, in) become our
kernels (in, out), q/k/v split to (d_model, heads, d_kv) and o to (heads, d_kv, d_model).
Tensors keep their stored dtype (Wan's bf16 stays bf16) unless a dtype is asked for. Every
tensor must find its place and every parameter must be found: anything else is one
ConversionError line listing the keys.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from fvdm_jax.convert.tensors import ConversionError, listed, read_safetensors
from fvdm_jax.convert.wan import TORCH_SUFFIXES, read_torch
from fvdm_jax.models.umt5 import CONFIG_DEFAULTS, REQUIRED_KEYS, feed_forward_kind

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
# Network keys of the returned config (transformers' config.json names).
CONFIG_KEYS = REQUIRED_KEYS + tuple(CONFIG_DEFAULTS)
# Prefixes of a whole encoder-decoder checkpoint that the encoder does not use.
SKIPPED_PREFIXES = ("decoder.", "lm_head.")
# Wan's per-block module names -> transformers' (weight suffix apart).
_WAN_BLOCK = {
    "norm1": "layer.0.layer_norm",
    "attn.q": "layer.0.SelfAttention.q",
    "attn.k": "layer.0.SelfAttention.k",
    "attn.v": "layer.0.SelfAttention.v",
    "attn.o": "layer.0.SelfAttention.o",
    "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
    "norm2": "layer.1.layer_norm",
    "ffn.gate.0": "layer.1.DenseReluDense.wi_0",
    "ffn.fc1": "layer.1.DenseReluDense.wi_1",
    "ffn.fc2": "layer.1.DenseReluDense.wo",
}
_WAN_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}


# --- reading files --------------------------------------------------------------------------------

def _read_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(TORCH_SUFFIXES):
        return read_torch(path)
    raise ConversionError(f"unknown weights file type of {path}: use .safetensors or one of "
                          f"{', '.join(TORCH_SUFFIXES)}")


def _weight_files(folder: str) -> list[str]:
    names = sorted(os.listdir(folder))
    index = [n for n in names if n.endswith((".safetensors.index.json", ".bin.index.json"))]
    safetensors_index = [n for n in index if n.endswith(".safetensors.index.json")]
    index = safetensors_index or index  # both kinds of shards: read the safetensors ones
    if len(index) > 1:
        raise ConversionError(f"{folder} holds several index files {index}; pass one model's folder")
    if index:
        try:
            with open(os.path.join(folder, index[0])) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{folder}/{index[0]} is not a weights index "
                                  f"({type(e).__name__}: {e})") from None
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if absent:
            raise ConversionError(f"{folder}/{index[0]} names shards that are not there: "
                                  f"{listed(absent)}")
        return [os.path.join(folder, s) for s in shards]
    for name in WEIGHT_FILES:
        if name in names:
            return [os.path.join(folder, name)]
    files = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
    if not files:
        files = [os.path.join(folder, n) for n in names if n.endswith(TORCH_SUFFIXES)]
    if len(files) > 1 and not all(f.endswith(".safetensors") for f in files):
        raise ConversionError(f"{folder} holds several torch weight files ({listed(files, 4)}) and "
                              f"no index; pass the file")
    if not files:
        raise ConversionError(f"{folder} holds no UMT5 weights (model.safetensors, shards with "
                              f"an index .json, or a .pth): pass the text encoder's folder or file")
    return files


def read_umt5_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
    """(flat state_dict as stored, config.json next to the weights or None) of `path`: a weights
    file or a folder (a diffusers pipeline folder is read from its text_encoder/ subfolder). A
    config.json without T5's d_model and d_kv (Wan's DiT config beside its .pth) is not used."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "text_encoder")) and not any(
            n.endswith((".safetensors", ".bin", ".pth")) for n in os.listdir(path)):
        path = os.path.join(path, "text_encoder")
    if os.path.isdir(path):
        folder, files = path, _weight_files(path)
    elif os.path.isfile(path):
        folder, files = os.path.dirname(path), [path]
    else:
        raise ConversionError(f"UMT5 text-encoder checkpoint {path} does not exist: pass a "
                              f"transformers UMT5EncoderModel folder or Wan's "
                              f"models_t5_umt5-xxl-enc-bf16.pth")
    sd: dict[str, np.ndarray] = {}
    seen: dict[str, str] = {}
    for file in files:
        for key, value in _read_file(file).items():
            if key in sd:
                raise ConversionError(f"tensor {key!r} is in both {seen[key]} and {file}")
            sd[key], seen[key] = value, file
    config = None
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except ValueError as e:
            raise ConversionError(f"{config_path} is not JSON ({e})") from None
        if not (isinstance(config, dict) and "d_model" in config and "d_kv" in config):
            config = None  # another model's config (a Wan release folder's is the DiT's)
    return sd, config


# --- names ----------------------------------------------------------------------------------------

def naming(sd: Mapping[str, np.ndarray]) -> str:
    """'transformers' or 'wan' (Wan's original T5Encoder), from the key names."""
    if any(k.startswith("encoder.block.") or k == "shared.weight" for k in sd):
        return "transformers"
    if any(k.startswith("blocks.") or k == "token_embedding.weight" for k in sd):
        return "wan"
    raise ConversionError(f"not a UMT5 encoder state_dict: no transformers or Wan T5 key names "
                          f"among {listed(sd, 6)}")


def wan_to_transformers(key: str) -> str:
    """The transformers name of a Wan T5Encoder key (unknown keys are returned unchanged)."""
    if key in _WAN_TOP:
        return _WAN_TOP[key]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.weight", key)
    if match and match.group(2) in _WAN_BLOCK:
        return f"encoder.block.{match.group(1)}.{_WAN_BLOCK[match.group(2)]}.weight"
    return key


def transformers_to_wan(key: str) -> str:
    top = {v: k for k, v in _WAN_TOP.items()}
    if key in top:
        return top[key]
    block = {v: k for k, v in _WAN_BLOCK.items()}
    match = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)\.weight", key)
    if match and match.group(2) in block:
        return f"blocks.{match.group(1)}.{block[match.group(2)]}.weight"
    return key


def to_transformers_names(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """(state_dict under transformers' names with the decoder / lm_head dropped, the naming);
    the input embedding is under `shared.weight` (from `encoder.embed_tokens.weight` if both are
    there: that is the one the encoder reads)."""
    names = naming(sd)
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        if names == "transformers" and key.startswith(SKIPPED_PREFIXES):
            continue
        name = wan_to_transformers(key) if names == "wan" else key
        if name in out:
            raise ConversionError(f"two keys, one of them {key!r}, both name {name!r}")
        out[name] = value
    embed = out.pop("encoder.embed_tokens.weight", None)
    if embed is not None:
        out["shared.weight"] = embed
    return out, names


# --- config ---------------------------------------------------------------------------------------

def infer_config(sd: Mapping[str, np.ndarray], config: Mapping | None = None) -> dict:
    """The transformers-style network config (CONFIG_KEYS) of a transformers-named state_dict:
    the config.json's values where it has them, else what the tensors say."""
    config = dict(config or {})
    if "shared.weight" not in sd:
        raise ConversionError(f"the checkpoint has no token embedding (shared.weight / "
                              f"encoder.embed_tokens.weight / token_embedding.weight) among "
                              f"{listed(sd, 6)}")
    vocab, d_model = (int(n) for n in sd["shared.weight"].shape)
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    prefix = "encoder.block.0.layer."
    table = sd.get(prefix + "0.SelfAttention.relative_attention_bias.weight")
    q = sd.get(prefix + "0.SelfAttention.q.weight")
    ffn = sd.get(prefix + "1.DenseReluDense.wi_1.weight", sd.get(prefix + "1.DenseReluDense.wi.weight"))
    inferred = dict(vocab_size=vocab, d_model=d_model, num_layers=max(layers) + 1 if layers else 0)
    if table is not None:
        inferred.update(relative_attention_num_buckets=int(table.shape[0]),
                        num_heads=int(table.shape[1]))
    if ffn is not None:
        inferred["d_ff"] = int(ffn.shape[0])
    heads = config.get("num_heads", inferred.get("num_heads"))
    if q is not None and heads:
        inferred["d_kv"] = int(q.shape[0]) // int(heads)
    out = {**CONFIG_DEFAULTS, **inferred, **{k: config[k] for k in CONFIG_KEYS if k in config}}
    if "feed_forward_proj" not in config and f"{prefix}1.DenseReluDense.wi.weight" in sd:
        raise ConversionError("the checkpoint has a non-gated FFN (DenseReluDense.wi) but no "
                              "config.json to say its activation; put the config.json next to it")
    missing = [k for k in CONFIG_KEYS if k not in out]
    if missing:
        raise ConversionError(f"cannot tell the UMT5 {', '.join(missing)} from the checkpoint: "
                              f"put its config.json next to the weights")
    try:
        feed_forward_kind(out)
    except ValueError as e:
        raise ConversionError(f"config.json: {e}") from None
    return {k: out[k] for k in CONFIG_KEYS}


# --- parameters -----------------------------------------------------------------------------------

def _slots(config: Mapping) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]]:
    """transformers key -> (parameter path, our shape, torch shape). A kernel (path ending in
    'kernel') is a torch Linear weight (out, in): transposed, then split into heads if need be."""
    d, h, k, f = (int(config[n]) for n in ("d_model", "num_heads", "d_kv", "d_ff"))
    _, gated = feed_forward_kind(config)
    vocab, buckets = int(config["vocab_size"]), int(config["relative_attention_num_buckets"])
    slots = {
        "shared.weight": (("encoder", "embed_tokens", "embedding"), (vocab, d), (vocab, d)),
        "encoder.final_layer_norm.weight": (("encoder", "final_layer_norm", "scale"), (d,), (d,)),
    }
    for i in range(int(config["num_layers"])):
        theirs, ours = f"encoder.block.{i}.layer.", ("encoder", f"block_{i}")
        attn = ours + ("layer_0", "SelfAttention")
        for x in "qkv":
            slots[f"{theirs}0.SelfAttention.{x}.weight"] = (attn + (x, "kernel"), (d, h, k), (h * k, d))
        slots[f"{theirs}0.SelfAttention.o.weight"] = (attn + ("o", "kernel"), (h, k, d), (d, h * k))
        slots[f"{theirs}0.SelfAttention.relative_attention_bias.weight"] = (
            attn + ("relative_attention_bias",), (buckets, h), (buckets, h))
        for j in (0, 1):
            slots[f"{theirs}{j}.layer_norm.weight"] = (
                ours + (f"layer_{j}", "layer_norm", "scale"), (d,), (d,))
        ffn = ours + ("layer_1", "DenseReluDense")
        for name in ("wi_0", "wi_1") if gated else ("wi",):
            slots[f"{theirs}1.DenseReluDense.{name}.weight"] = (ffn + (name, "kernel"), (d, f), (f, d))
        slots[f"{theirs}1.DenseReluDense.wo.weight"] = (ffn + ("wo", "kernel"), (f, d), (d, f))
    return slots


def convert_state_dict(sd: Mapping[str, np.ndarray], config: Mapping, dtype: str | None = None,
                       names: str = "transformers") -> dict:
    """A transformers-named encoder state_dict -> {'params': ...} of `umt5_from_config(config)`
    (numpy leaves, stored dtypes kept unless `dtype` is given). Unplaced or missing tensors, or
    wrong shapes: ConversionError, naming the keys as the file does (`names`)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    slots = _slots(config)
    shown = transformers_to_wan if names == "wan" else str
    unplaced = [shown(k) for k in sd if k not in slots]
    if unplaced:
        raise ConversionError(f"{len(unplaced)} tensors have no place in the UMT5 encoder: "
                              f"{listed(unplaced)}")
    missing = [k for k in slots if k not in sd]
    if missing:
        hint = ""
        if all(".relative_attention_bias." in k for k in missing):
            hint = (" (a T5 checkpoint has the position bias in block 0 only; this is the UMT5 "
                    "encoder, which has one in every block)")
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensors the UMT5 encoder "
                              f"needs: {listed([shown(k) for k in missing])}{hint}")
    params: dict = {}
    wrong = []
    for key, (path, shape, torch_shape) in slots.items():
        value = np.asarray(sd[key])
        if tuple(value.shape) != torch_shape:
            wrong.append(f"{shown(key)} {tuple(value.shape)} (expected {torch_shape})")
            continue
        if path[-1] == "kernel":
            value = value.T.reshape(shape)
        if dtype is not None:
            value = value.astype(DTYPES[dtype])
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(value)
    if wrong:
        raise ConversionError(f"{len(wrong)} tensors do not fit the UMT5 config's shapes: "
                              f"{listed(wrong, 6)}")
    return {"params": params}


def convert_umt5(path: str, dtype: str | None = None) -> tuple[dict, dict]:
    """(params {'params': ...}, config) of the UMT5 encoder checkpoint at `path`.

    config: transformers' config.json keys of the network (CONFIG_KEYS; `umt5_from_config` builds
    the module from it) plus 'param_dtype', the name of the parameters' dtype."""
    sd, config = read_umt5_checkpoint(path)
    sd, names = to_transformers_names(sd)
    model_config = infer_config(sd, config)
    params = convert_state_dict(sd, model_config, dtype, names)
    stored = {leaf.dtype for leaf in _leaves(params)}
    common = stored.pop() if len(stored) == 1 else None
    model_config["param_dtype"] = next((n for n, d in DTYPES.items() if d == common), "mixed")
    return params, model_config


def _leaves(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield value
