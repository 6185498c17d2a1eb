"""Wan 2.1 text-to-video transformer weights -> fvdm_jax Wan parameters.

Three namings are read, whatever the file layout (one .safetensors file, a folder with sharded
*.safetensors and a `*.safetensors.index.json`, or a torch file):

  diffusers    WanTransformer3DModel: `condition_embedder.time_embedder.linear_1.weight`,
               `blocks.N.attn1.to_q.weight`, `blocks.N.norm2.weight` (cross-attention norm),
               `blocks.N.ffn.net.0.proj.weight`, `blocks.N.scale_shift_table`, `proj_out.weight`
  original     Wan-Video/Wan2.1 `WanModel` (also the Wan-AI/Wan2.1-T2V-* release files):
               `time_embedding.0.weight`, `blocks.N.self_attn.q.weight`, `blocks.N.norm3.weight`
               (cross-attention norm), `blocks.N.ffn.0.weight`, `blocks.N.modulation`,
               `head.head.weight`, `head.modulation`
  DiffSynth    diffsynth/models/wan_video_dit.py keeps the original names; its training
               checkpoints and ComfyUI files may put a prefix in front (`dit.`, `pipe.dit.`,
               `model.diffusion_model.`, `diffusion_model.`, `model.`), which is stripped.

The model shape comes from a config.json next to the weights (diffusers' keys or the original
`dim` / `num_heads` / ... keys), else from the tensors (the head count from --num_heads or Wan's
head width of 128). Tensors keep their stored dtype (bf16 stays bf16) unless a dtype is asked for.
Every tensor must find its place and every parameter must be found: anything else is one
ConversionError line listing the keys.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np

from fvdm_jax.convert.tensors import ConversionError, listed, read_safetensors
from fvdm_jax.models.wan import Wan, wan_from_config, wan_model_config

# Prefixes other tools put in front of the model's own key names (longest first).
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "pipe.dit.", "dit.", "model.",
                "module.", "_orig_mod.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
WAN_HEAD_DIM = 128
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}

# Original (Wan / DiffSynth) module names -> diffusers module names (weight/bias suffix apart).
_TOP_RENAMES = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
_BLOCK_RENAMES = {"modulation": "scale_shift_table", "norm3": "norm2",  # the cross-attention norm
                  "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
for _ours, _theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _BLOCK_RENAMES.update({f"{_ours}.{a}": f"{_theirs}.{b}" for a, b in (
        ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
        ("norm_q", "norm_q"), ("norm_k", "norm_k"))})


def _rename(key: str, renames: Mapping[str, str], blocks: Mapping[str, str]) -> str:
    match = re.fullmatch(r"(blocks\.\d+\.)(.+?)((?:\.weight|\.bias)?)", key)
    if match:
        head, module, tail = match.groups()
        return head + blocks.get(module, module) + tail
    module, dot, tail = key.rpartition(".")
    if tail in ("weight", "bias") and module in renames:
        return renames[module] + dot + tail
    return renames.get(key, key)


def original_to_diffusers(key: str) -> str:
    """The diffusers name of an original-Wan key (unknown keys are returned unchanged)."""
    return _rename(key, _TOP_RENAMES, _BLOCK_RENAMES)


def diffusers_to_original(key: str) -> str:
    return _rename(key, {v: k for k, v in _TOP_RENAMES.items()},
                   {v: k for k, v in _BLOCK_RENAMES.items()})


def naming(sd: Mapping[str, np.ndarray]) -> str:
    """'diffusers' or 'original' (Wan / DiffSynth), from the key names."""
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd):
        return "diffusers"
    if any(k.startswith(("time_embedding.", "text_embedding.")) or ".self_attn." in k for k in sd):
        return "original"
    raise ConversionError(f"not a Wan transformer state_dict: no diffusers or original Wan key "
                          f"names among {listed(sd, 6)}")


def strip_prefixes(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes the prefix (KEY_PREFIXES) that the patch embedding's key carries from every key."""
    out = dict(sd)
    while "patch_embedding.weight" not in out:
        prefix = next((p for p in KEY_PREFIXES if p + "patch_embedding.weight" in out), None)
        if prefix is None:
            break
        out = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in out.items()}
    return out


def _torch_to_numpy(value) -> np.ndarray:
    import torch

    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()


def read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch (pip install torch), or convert it to "
                          f".safetensors first") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
        inner = next((obj[k] for k in ("ema", "state_dict", "model", "module") if k in obj), None)
        if inner is None:
            raise ConversionError(f"{path}: no state_dict found (top-level keys {listed(obj, 6)})")
        obj = inner
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return {str(k): _torch_to_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}


def _read_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(TORCH_SUFFIXES):
        return read_torch(path)
    raise ConversionError(f"unknown weights file type of {path}: use .safetensors or one of "
                          f"{', '.join(TORCH_SUFFIXES)}")


def _merge(parts) -> dict[str, np.ndarray]:
    out, seen = {}, {}
    for path, sd in parts:
        for key, value in sd.items():
            if key in out:
                raise ConversionError(f"tensor {key!r} is in both {seen[key]} and {path}")
            out[key], seen[key] = value, path
    return out


def read_wan_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
    """(flat state_dict with prefixes stripped, config.json next to the weights or None).

    path: a weights file, or a folder holding `*.safetensors.index.json` + its shards,
    diffusion_pytorch_model.safetensors, or other *.safetensors files (all read); a diffusers
    pipeline folder is read from its transformer/ subfolder."""
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "transformer")) and not any(
            n.endswith(".safetensors") for n in os.listdir(path)):
        path = os.path.join(path, "transformer")  # a whole diffusers pipeline folder
    if os.path.isdir(path):
        folder = path
        names = sorted(os.listdir(folder))
        index = [n for n in names if n.endswith(".safetensors.index.json")]
        if len(index) > 1:
            raise ConversionError(f"{folder} holds several index files {index}; pass one model's "
                                  f"folder")
        if index:
            with open(os.path.join(folder, index[0])) as f:
                weight_map = json.load(f).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
            absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if absent:
                raise FileNotFoundError(f"{folder}/{index[0]} names shards that are not there: "
                                        f"{listed(absent)}")
            files = [os.path.join(folder, s) for s in shards]
        elif DIFFUSERS_WEIGHTS in names:
            files = [os.path.join(folder, DIFFUSERS_WEIGHTS)]
        else:
            files = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
        if not files:
            raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    elif os.path.isfile(path):
        folder, files = os.path.dirname(path), [path]
    else:
        raise FileNotFoundError(f"Wan checkpoint {path} does not exist")
    sd = strip_prefixes(_merge((f, _read_file(f)) for f in files))
    config_path = os.path.join(folder, "config.json")
    config = None
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
    return sd, config


def infer_model_config(sd: Mapping[str, np.ndarray], config: Mapping | None = None,
                       num_heads: int | None = None) -> dict:
    """The Wan `model` config of a diffusers-named state_dict (and its config.json if any)."""
    config = dict(config or {})
    if config.get("image_dim") is not None or config.get("added_kv_proj_dim") is not None or \
            config.get("model_type", "t2v") != "t2v" or any(".add_k_proj." in k for k in sd):
        raise ValueError("this is a Wan image-to-video (or other non-T2V) checkpoint; only the "
                         "text-to-video transformer is implemented")
    if "patch_embedding.weight" not in sd:
        raise ConversionError(f"not a Wan transformer state_dict: no patch_embedding.weight among "
                              f"{listed(sd, 6)}")
    patch = sd["patch_embedding.weight"]  # (D, C, pt, ph, pw)
    dim, in_channels = int(patch.shape[0]), int(patch.shape[1])
    patch_size = tuple(int(p) for p in patch.shape[2:])
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}

    def shape(key, axis, default):
        return int(sd[key].shape[axis]) if key in sd else default

    if num_heads is None:
        if "num_attention_heads" in config:
            num_heads = int(config["num_attention_heads"])
        elif "num_heads" in config:
            num_heads = int(config["num_heads"])
        elif dim % WAN_HEAD_DIM == 0:
            num_heads = dim // WAN_HEAD_DIM
        else:
            raise ConversionError(f"cannot tell the head count of width {dim} (not a multiple of "
                                  f"Wan's head width {WAN_HEAD_DIM}): pass --num_heads")
    out = shape("proj_out.weight", 0, None)
    return wan_model_config(
        "1.3B",
        dim=dim,
        ffn_dim=shape("blocks.0.ffn.net.0.proj.weight", 0, int(config.get("ffn_dim", 0))),
        num_heads=num_heads,
        num_layers=max(layers) + 1 if layers else 0,
        freq_dim=shape("condition_embedder.time_embedder.linear_1.weight", 1, 256),
        text_dim=shape("condition_embedder.text_embedder.linear_1.weight", 1, 4096),
        in_channels=in_channels,
        out_channels=out // int(np.prod(patch_size)) if out else in_channels,
        patch_size=patch_size,
        eps=float(config.get("eps", 1e-6)),
        qk_norm="blocks.0.attn1.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm2.weight" in sd,
        rope_max_seq_len=int(config.get("rope_max_seq_len", 1024)),
    )


def _slots(model: Wan) -> dict[str, tuple[tuple[str, ...], str, int | None]]:
    """diffusers key -> (parameter path, transform, layer index or None)."""
    slots = {}

    def linear(theirs, path, kind="linear", layer=None):
        slots[f"{theirs}.weight"] = (path + ("kernel",), kind, layer)
        slots[f"{theirs}.bias"] = (path + ("bias",), "heads" if kind == "qkv" else "copy", layer)

    linear("patch_embedding", ("patch_embed",), "conv")
    linear("condition_embedder.time_embedder.linear_1", ("time_fc1",))
    linear("condition_embedder.time_embedder.linear_2", ("time_fc2",))
    linear("condition_embedder.time_proj", ("time_proj",))
    linear("condition_embedder.text_embedder.linear_1", ("text_fc1",))
    linear("condition_embedder.text_embedder.linear_2", ("text_fc2",))
    linear("proj_out", ("head",))
    slots["scale_shift_table"] = (("head_modulation",), "table", None)
    for i in range(model.num_layers):
        p = f"blocks.{i}."
        for theirs, ours in (("attn1", "self_attn"), ("attn2", "cross_attn")):
            for x in "qkv":
                linear(f"{p}{theirs}.to_{x}", ("blocks", ours, x), "qkv", i)
            linear(f"{p}{theirs}.to_out.0", ("blocks", ours, "o"), "out", i)
            if model.qk_norm:
                for x in "qk":
                    slots[f"{p}{theirs}.norm_{x}.weight"] = (
                        ("blocks", ours, f"norm_{x}", "scale"), "heads", i)
        if model.cross_attn_norm:
            slots[f"{p}norm2.weight"] = (("blocks", "cross_norm", "scale"), "copy", i)
            slots[f"{p}norm2.bias"] = (("blocks", "cross_norm", "bias"), "copy", i)
        linear(f"{p}ffn.net.0.proj", ("blocks", "ffn", "fc1"), "linear", i)
        linear(f"{p}ffn.net.2", ("blocks", "ffn", "fc2"), "linear", i)
        slots[f"{p}scale_shift_table"] = (("blocks", "modulation"), "table", i)
    return slots


def _transform(value: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "conv":  # (D, C, pt, ph, pw) -> ((pt ph pw C), D); pt is 1
        return value.transpose(2, 3, 4, 1, 0).reshape(shape)
    if kind in ("linear", "qkv"):  # torch (out, in) -> (in, out...)
        return value.T.reshape(shape)
    if kind == "out":  # (D, H*Dh) -> (H, Dh, D)
        return value.T.reshape(shape)
    return value.reshape(shape)  # copy / heads / table


def convert_state_dict(sd: Mapping[str, np.ndarray], model: Wan, dtype: str | None = None,
                       names: str = "diffusers") -> dict:
    """A diffusers-named state_dict -> {'params': ...} for `model` (numpy leaves, stored dtypes
    kept unless `dtype` is given). Unplaced or missing tensors, or wrong shapes: ConversionError,
    naming the keys as the file does (`names`: 'diffusers' or 'original')."""
    slots = _slots(model)
    shown = diffusers_to_original if names == "original" else str
    unplaced = [shown(k) for k in sd if k not in slots]
    if unplaced:
        raise ConversionError(f"{len(unplaced)} tensors have no place in the Wan T2V model: "
                              f"{listed(unplaced)}")
    missing = [shown(k) for k in slots if k not in sd]
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensors the model needs: "
                              f"{listed(missing)}")
    abstract = _abstract_params(model)
    params: dict = {}
    stacks: dict[tuple[str, ...], list] = {}
    wrong = []
    for key, (path, kind, layer) in slots.items():
        want = _leaf(abstract, path).shape
        if layer is not None:
            want = want[1:]
        value = np.asarray(sd[key])
        if value.size != int(np.prod(want)):
            wrong.append(f"{shown(key)} {tuple(value.shape)} (expected {int(np.prod(want))} values as "
                         f"{tuple(want)})")
            continue
        value = _transform(value, kind, want)
        if dtype is not None:
            value = value.astype(DTYPES[dtype])
        if layer is None:
            _set(params, path, value)
        else:
            stacks.setdefault(path, [None] * model.num_layers)[layer] = value
    if wrong:
        raise ConversionError(f"{len(wrong)} tensors do not fit the model's shapes: "
                              f"{listed(wrong, 6)}")
    for path, values in stacks.items():
        dtypes = {v.dtype for v in values}
        common = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
        _set(params, path, np.stack([v.astype(common) for v in values]))
    return {"params": params}


def _abstract_params(model: Wan):
    shape = (1, 1, 2 * model.patch_size[1], 2 * model.patch_size[2], model.in_channels)
    x = jax.ShapeDtypeStruct(shape, np.float32)
    t = jax.ShapeDtypeStruct((1, 1), np.float32)
    ctx = jax.ShapeDtypeStruct((1, 1, model.text_dim), np.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"]


def _leaf(tree, path):
    for name in path:
        tree = tree[name]
    return tree.unbox() if hasattr(tree, "unbox") else tree


def _set(tree: dict, path, value):
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def load_wan_state_dict(path: str, num_heads: int | None = None):
    """(diffusers-named state_dict, model config, the file's naming) of a Wan checkpoint."""
    sd, config = read_wan_checkpoint(path)
    names = naming(sd)
    if names == "original":
        renamed = {}
        for key, value in sd.items():
            name = original_to_diffusers(key)
            if name in renamed:
                raise ConversionError(f"two keys, one of them {key!r}, both name {name!r}")
            renamed[name] = value
        sd = renamed
    return sd, infer_model_config(sd, config, num_heads), names


def convert_wan(path: str, num_heads: int | None = None, dtype: str | None = None):
    """(params {'params': ...}, model config) of the Wan checkpoint at `path`."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not one of {list(DTYPES)}")
    sd, model_config, names = load_wan_state_dict(path, num_heads)
    model = wan_from_config(model_config)
    params = convert_state_dict(sd, model, dtype, names)
    floats = [a.dtype for a in jax.tree_util.tree_leaves(params)]
    stored = max(set(floats), key=floats.count)
    name = next((n for n, d in DTYPES.items() if d == stored), "float32")
    model_config.update(param_dtype=name, dtype=name)
    return params, model_config
