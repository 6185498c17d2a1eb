"""Official FVDM (`LatteVIDEO`) and Latte state_dicts <-> fvdm_jax DiT parameters.

FVDM names its blocks `blocks_spatial.{i}` / `blocks_temp.{i}`; Latte uses one list `blocks.{j}`
alternating spatial (even j) and temporal (odd j). Torch Linear weights are (out, in); the patch
embedding is a conv (D, C, p, p). The frozen `pos_embed` / `temp_embed` tables are not parameters
here (the model recomputes them); the converter checks that the checkpoint's tables agree.

Key names are read as the official sampler reads them: a `torch.compile` prefix `_orig_mod.` is
stripped (as sample/sample_video*.py do), and so is DDP's `module.`. Every tensor of the file must
find its place and every parameter must be found: anything else is one ConversionError line that
lists the keys. `read_checkpoint` loads .pt / .safetensors / .npz files into a flat state_dict.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fvdm_jax.convert.tensors import ConversionError, listed, read_safetensors, to_numpy
from fvdm_jax.models.dit import MODEL_SIZES, DiT
from fvdm_jax.models.embeddings import sincos_1d, sincos_2d

CONTAINER_KEYS = ("ema", "model", "state_dict", "module")
# Wrappers around the real key: DDP's `module.` and torch.compile's `_orig_mod.` (either order).
KEY_PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")
FIXED_TABLES = ("pos_embed", "temp_embed")
_BLOCK_PARTS = {
    "attn.qkv": ("attn", "qkv"),
    "attn.proj": ("attn", "proj"),
    "mlp.fc1": ("mlp", "fc1"),
    "mlp.fc2": ("mlp", "fc2"),
    "adaLN_modulation.1": ("adaLN", "dense"),
}


def strip_key(key: str) -> str:
    """The model's own name of a state_dict key: `module.` (DDP) and `_orig_mod.` (torch.compile)
    removed. Like the official sampler, `_orig_mod.` is cut wherever it occurs (what follows it)."""
    key = str(key)
    while True:
        if "_orig_mod." in key:
            key = key.split("_orig_mod.", 1)[1]
        elif key.startswith("module."):
            key = key[len("module."):]
        else:
            return key


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Finds the tensors inside the official containers ({'ema': sd} first, {'model': sd}, ...) and
    strips the DDP / torch.compile key prefixes; numpy arrays out."""
    sd = obj
    while isinstance(sd, Mapping) and not _looks_like_state_dict(sd):
        inner = next((sd[k] for k in CONTAINER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None:
            raise ConversionError(
                f"no model state_dict found: top-level keys {sorted(map(str, sd))[:8]}; expected a "
                f"state_dict or a container with one of {CONTAINER_KEYS}"
            )
        sd = inner
    out, sources = {}, {}
    for key, value in sd.items():
        name = strip_key(key)
        if name in out:
            raise ConversionError(f"state_dict keys {sources[name]!r} and {key!r} both name {name!r} "
                                  f"once the {KEY_PREFIXES} prefixes are stripped; keep one of them")
        out[name], sources[name] = to_numpy(value), key
    return out


def _looks_like_state_dict(d: Mapping) -> bool:
    return any(strip_key(k).startswith("x_embedder.") for k in d)


def read_checkpoint(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    """Loads the tensors of a checkpoint file into a flat {name: numpy array} state_dict.

    .pt/.pth/.bin/.ckpt: torch.load(weights_only=True) (torch is an optional extra); .safetensors
    and .npz need no torch; `prefix` picks one state_dict out of an .npz that holds several."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as data:
            raw = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
        if not raw:
            raise ConversionError(f"{path} has no arrays under prefix {prefix!r}")
        return unwrap_state_dict(raw)
    if ext == ".safetensors":
        return unwrap_state_dict(read_safetensors(path))
    if ext in TORCH_SUFFIXES:
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"reading {ext} files needs torch (an optional extra: pip install torch), or save "
                f"the state_dict as .safetensors / .npz and read that"
            ) from None
        return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    raise ConversionError(f"unknown checkpoint type {ext!r} of {path}: use one of "
                          f"{', '.join(CHECKPOINT_SUFFIXES)}")


def step_from_file_name(path: str) -> int | None:
    """The training step an official checkpoint's name carries (train_video.py saves
    `{step:07d}.pt` and reads the step back from the name when fine-tuning), else None."""
    stem = os.path.basename(path).split(".")[0]
    return int(stem) if stem.isdigit() else None


def _block_layout(sd: Mapping[str, np.ndarray]) -> str:
    if any(k.startswith("blocks_spatial.") for k in sd):
        return "fvdm"
    if any(k.startswith("blocks.") for k in sd):
        return "latte"
    raise ConversionError("state_dict has neither blocks_spatial.* (FVDM) nor blocks.* (Latte)")


def _block_prefixes(sd, layout: str, kind: str, num_pairs: int) -> list[str]:
    if layout == "fvdm":
        name = "blocks_spatial" if kind == "spatial" else "blocks_temp"
        return [f"{name}.{i}" for i in range(num_pairs)]
    offset = 0 if kind == "spatial" else 1
    return [f"blocks.{2 * i + offset}" for i in range(num_pairs)]


def count_blocks(sd: Mapping[str, np.ndarray]) -> int:
    """Total depth (spatial + temporal blocks) of a state_dict."""
    layout = _block_layout(sd)
    pattern = re.compile(r"^(blocks_spatial|blocks_temp|blocks)\.(\d+)\.")
    indices = {(m.group(1), int(m.group(2))) for k in sd if (m := pattern.match(k))}
    if layout == "fvdm" and any(name == "blocks" for name, _ in indices):
        raise ConversionError("state_dict mixes FVDM blocks_spatial.* and Latte blocks.* names")
    return len(indices)


def infer_model_config(sd: Mapping[str, np.ndarray], num_heads: int | None = None) -> dict:
    """Model config keys implied by a state_dict's shapes.

    The head count is not visible in the weights: it comes from the named size with the same width
    and depth (S/B/L/XL), or must be given.
    """
    for key in ("x_embedder.proj.weight", "final_layer.linear.weight"):
        if key not in sd:
            raise ConversionError(f"not an FVDM/Latte state_dict: no {key} (keys found: {listed(sd, 6)})")
    weight = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = weight.shape[0], weight.shape[1], weight.shape[2]
    depth = count_blocks(sd)
    out_features = sd["final_layer.linear.weight"].shape[0]
    out_channels = out_features // (patch * patch)
    if "pos_embed" in sd:
        tokens = sd["pos_embed"].shape[1]
    else:
        raise ConversionError("state_dict lacks pos_embed; pass the model config explicitly")
    grid = math.isqrt(tokens)
    named = {(h, d): (name, n) for name, (h, d, n) in MODEL_SIZES.items()}
    size, heads = named.get((hidden, depth), ("custom", None))
    if num_heads is not None:
        heads = num_heads
        size = "custom" if named.get((hidden, depth), (None, None))[1] != num_heads else size
    if heads is None:
        raise ConversionError(
            f"cannot tell the head count of a hidden={hidden}, depth={depth} model from its "
            f"weights; pass --config with model.num_heads"
        )
    config = {
        "size": size,
        "hidden_size": None if size != "custom" else hidden,
        "depth": None if size != "custom" else depth,
        "num_heads": None if size != "custom" else heads,
        "patch_size": patch,
        "in_channels": in_channels,
        "input_size": grid * patch,
        "num_frames": sd["temp_embed"].shape[1] if "temp_embed" in sd else 16,
        "learn_sigma": out_channels == 2 * in_channels,
        "num_classes": 0,
        "class_dropout_prob": 0.1,
    }
    if "y_embedder.embedding_table.weight" in sd:
        # The official tables carry a null-class row whenever label dropout is on.
        config["num_classes"] = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    return config


def _linear(sd, prefix, used):
    used.update({f"{prefix}.weight", f"{prefix}.bias"})
    return sd[f"{prefix}.weight"].T, sd[f"{prefix}.bias"]


def _block_params(sd, prefixes, model: DiT, used) -> dict:
    d, h = model.hidden_size, model.num_heads
    stacked = {}
    for torch_part, (group, leaf) in _BLOCK_PARTS.items():
        kernels, biases = [], []
        for prefix in prefixes:
            kernel, bias = _linear(sd, f"{prefix}.{torch_part}", used)
            if torch_part == "attn.qkv":
                kernel, bias = kernel.reshape(d, 3, h, d // h), bias.reshape(3, h, d // h)
            elif torch_part == "attn.proj":
                kernel = kernel.reshape(h, d // h, d)
            kernels.append(kernel)
            biases.append(bias)
        stacked.setdefault(group, {})[leaf] = {
            "kernel": np.stack(kernels),
            "bias": np.stack(biases),
        }
    return stacked


_TOP_LEVEL = ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2",
              "final_layer.adaLN_modulation.1", "final_layer.linear")
_KNOWN_KEY = re.compile(
    r"^(?:(?:x_embedder\.proj|t_embedder\.mlp\.[02]|final_layer\.(?:adaLN_modulation\.1|linear)"
    r"|(?:blocks_spatial|blocks_temp|blocks)\.\d+\.(?:" + "|".join(re.escape(p) for p in _BLOCK_PARTS)
    + r"))\.(?:weight|bias)|y_embedder\.embedding_table\.weight|pos_embed|temp_embed)$")


def split_known(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the tensors an FVDM / Latte model has a place for, the names of all others)."""
    known = {k: v for k, v in sd.items() if _KNOWN_KEY.match(k)}
    return known, sorted(k for k in sd if k not in known)


def required_keys(sd: Mapping[str, np.ndarray], depth: int) -> list[str]:
    """The tensors a model of `depth` blocks reads from a state_dict of this layout (the label
    table only when the state_dict has one: its absence is an unconditional model)."""
    layout = _block_layout(sd)
    prefixes = list(_TOP_LEVEL)
    for kind in ("spatial", "temporal"):
        for block in _block_prefixes(sd, layout, kind, depth // 2):
            prefixes.extend(f"{block}.{part}" for part in _BLOCK_PARTS)
    keys = [f"{p}.{leaf}" for p in prefixes for leaf in ("weight", "bias")]
    return keys + (["y_embedder.embedding_table.weight"] if "y_embedder.embedding_table.weight" in sd else [])


def convert_state_dict(sd: Mapping[str, np.ndarray], model: DiT, *, check_tables=True) -> dict:
    """Official/Latte state_dict -> {'params': ...} for `model` (float32 numpy leaves).

    Every tensor must be used and every parameter must be found, with matching shapes; a
    mismatch is one ConversionError line listing the keys.
    """
    missing = [k for k in ("x_embedder.proj.weight", "final_layer.linear.weight") if k not in sd]
    if missing:
        raise ConversionError(f"not an FVDM/Latte state_dict: missing {missing} (keys found: "
                              f"{listed(sd, 6)})")
    used: set[str] = set()
    layout = _block_layout(sd)
    num_pairs = model.depth // 2
    have = count_blocks(sd)
    if have != model.depth:
        raise ConversionError(
            f"checkpoint has {have} blocks but model.depth={model.depth}; fix the model config"
        )
    missing = [k for k in required_keys(sd, model.depth) if k not in sd]
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensors the model needs: "
                              f"{listed(missing)}; it is incomplete or not an FVDM/Latte state_dict")
    conv = sd["x_embedder.proj.weight"]  # (D, C, p, p) -> ((p q c), D)
    used.update({"x_embedder.proj.weight", "x_embedder.proj.bias"})
    params = {
        "x_embedder": {
            "kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
            "bias": sd["x_embedder.proj.bias"],
        },
        "t_embedder": {},
        "blocks": {
            "spatial": _block_params(sd, _block_prefixes(sd, layout, "spatial", num_pairs), model, used),
            "temporal": _block_params(
                sd, _block_prefixes(sd, layout, "temporal", num_pairs), model, used
            ),
        },
    }
    for ours, theirs in (("fc1", "t_embedder.mlp.0"), ("fc2", "t_embedder.mlp.2")):
        kernel, bias = _linear(sd, theirs, used)
        params["t_embedder"][ours] = {"kernel": kernel, "bias": bias}
    kernel, bias = _linear(sd, "final_layer.adaLN_modulation.1", used)
    params["final_adaLN"] = {"dense": {"kernel": kernel, "bias": bias}}
    kernel, bias = _linear(sd, "final_layer.linear", used)
    params["final_linear"] = {"kernel": kernel, "bias": bias}
    if "y_embedder.embedding_table.weight" in sd:
        params["y_embedder"] = {"embedding": sd["y_embedder.embedding_table.weight"]}
        used.add("y_embedder.embedding_table.weight")

    if check_tables:
        _check_frozen_tables(sd, model)
    used.update(FIXED_TABLES)
    unused = sorted(set(sd) - used)
    if unused:
        raise ConversionError(f"{len(unused)} checkpoint tensors have no place in the model: "
                              f"{listed(unused)}; convert an FVDM (blocks_spatial/blocks_temp) or "
                              f"Latte (blocks) DiT state_dict")

    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), {"params": params})
    _check_shapes(params, model)
    return params


def _check_frozen_tables(sd, model: DiT):
    grid = model.input_size // model.patch_size
    for key, ours in (
        ("pos_embed", sincos_2d(model.hidden_size, grid)),
        ("temp_embed", sincos_1d(model.hidden_size, np.arange(model.num_frames))),
    ):
        if key not in sd:
            continue
        theirs = np.asarray(sd[key], np.float64)
        if theirs.size != ours.size or np.max(np.abs(theirs.reshape(ours.shape) - ours)) > 1e-5:
            raise ConversionError(
                f"checkpoint {key} {tuple(sd[key].shape)} differs from the model's fixed sin-cos "
                f"table {ours.shape}: check model.input_size / patch_size / num_frames"
            )


def _abstract_params(model: DiT):
    import flax.linen as nn
    import jax.numpy as jnp

    b, f = 1, model.num_frames
    x = jax.ShapeDtypeStruct((b, f, model.input_size, model.input_size, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((b, f), jnp.int32)
    y = jax.ShapeDtypeStruct((b,), jnp.int32) if model.num_classes else None
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, y))


def _check_shapes(params, model: DiT):
    expected = _abstract_params(model)
    want = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    if want.keys() != got.keys():
        raise ConversionError(
            f"parameter names differ: missing {listed(want.keys() - got.keys(), 4) or 'none'}, "
            f"unexpected {listed(got.keys() - want.keys(), 4) or 'none'} (check model.num_classes "
            f"/ class_dropout_prob against the checkpoint)"
        )
    bad = [f"{k} {tuple(got[k])} vs {tuple(want[k])}" for k in want if tuple(got[k]) != tuple(want[k])]
    if bad:
        raise ConversionError(f"shape mismatch (checkpoint vs model) at {listed(bad, 6)}; fix the "
                              f"model config to the checkpoint's")


def convert_as_saved(sd: Mapping[str, np.ndarray], num_heads: int | None = None):
    """A state_dict converted with the model its shapes describe, for fine-tuning another model:
    ({'params': ...}, that model's config (`infer_model_config`), the names of the tensors that
    no FVDM / Latte model has a place for, which are left out)."""
    from fvdm_jax.models.dit import model_from_config

    known, unknown = split_known(sd)
    config = infer_model_config(known, num_heads)
    return convert_state_dict(known, model_from_config(config)), config, unknown


def to_official_state_dict(params: Mapping, model: DiT) -> dict[str, np.ndarray]:
    """fvdm_jax params -> an official FVDM `LatteVIDEO` state_dict (numpy, torch layouts)."""
    p = jax.tree_util.tree_map(np.asarray, dict(params["params"]))
    d = model.hidden_size
    sd = {}
    kernel = p["x_embedder"]["kernel"]  # ((p q c), D)
    pp, c = model.patch_size, model.in_channels
    sd["x_embedder.proj.weight"] = kernel.reshape(pp, pp, c, d).transpose(3, 2, 0, 1)
    sd["x_embedder.proj.bias"] = p["x_embedder"]["bias"]
    for ours, theirs in (("fc1", "t_embedder.mlp.0"), ("fc2", "t_embedder.mlp.2")):
        sd[f"{theirs}.weight"] = p["t_embedder"][ours]["kernel"].T
        sd[f"{theirs}.bias"] = p["t_embedder"][ours]["bias"]
    if "y_embedder" in p:
        sd["y_embedder.embedding_table.weight"] = p["y_embedder"]["embedding"]
    grid = model.input_size // model.patch_size
    sd["pos_embed"] = sincos_2d(d, grid)[None].astype(np.float32)
    sd["temp_embed"] = sincos_1d(d, np.arange(model.num_frames))[None].astype(np.float32)
    for kind, name in (("spatial", "blocks_spatial"), ("temporal", "blocks_temp")):
        blocks = p["blocks"][kind]
        for i in range(model.depth // 2):
            for torch_part, (group, leaf) in _BLOCK_PARTS.items():
                kernel = blocks[group][leaf]["kernel"][i]
                bias = blocks[group][leaf]["bias"][i]
                if torch_part == "attn.qkv":  # (D, 3, H, Dh) -> (D, 3D)
                    kernel = kernel.reshape(d, 3 * d)
                elif torch_part == "attn.proj":  # (H, Dh, D) -> (D, D)
                    kernel = kernel.reshape(d, d)
                sd[f"{name}.{i}.{torch_part}.weight"] = kernel.T
                sd[f"{name}.{i}.{torch_part}.bias"] = bias.reshape(-1)
    sd["final_layer.adaLN_modulation.1.weight"] = p["final_adaLN"]["dense"]["kernel"].T
    sd["final_layer.adaLN_modulation.1.bias"] = p["final_adaLN"]["dense"]["bias"]
    sd["final_layer.linear.weight"] = p["final_linear"]["kernel"].T
    sd["final_layer.linear.bias"] = p["final_linear"]["bias"]
    return sd
