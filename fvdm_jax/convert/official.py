"""Official FVDM (`LatteVIDEO`) and Latte state_dicts <-> fvdm_jax DiT parameters.

FVDM names its blocks `blocks_spatial.{i}` / `blocks_temp.{i}`; Latte uses one list `blocks.{j}`
alternating spatial (even j) and temporal (odd j). Torch Linear weights are (out, in); the patch
embedding is a conv (D, C, p, p). The frozen `pos_embed` / `temp_embed` tables are not parameters
here (the model recomputes them); the converter checks that the checkpoint's tables agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fvdm_jax.models.dit import MODEL_SIZES, DiT
from fvdm_jax.models.embeddings import sincos_1d, sincos_2d

CONTAINER_KEYS = ("ema", "model", "state_dict", "module")
_BLOCK_PARTS = {
    "attn.qkv": ("attn", "qkv"),
    "attn.proj": ("attn", "proj"),
    "mlp.fc1": ("mlp", "fc1"),
    "mlp.fc2": ("mlp", "fc2"),
    "adaLN_modulation.1": ("adaLN", "dense"),
}


class ConversionError(ValueError):
    """A checkpoint does not match the model it is converted to."""


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Finds the tensors inside the official containers ({'ema': sd}, {'model': sd}, DDP 'module.')."""
    sd = obj
    while isinstance(sd, Mapping) and not _looks_like_state_dict(sd):
        inner = next((sd[k] for k in CONTAINER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None:
            raise ConversionError(
                f"no model state_dict found: top-level keys {sorted(sd)[:8]}; expected a state_dict "
                f"or a container with one of {CONTAINER_KEYS}"
            )
        sd = inner
    out = {}
    for key, value in sd.items():
        key = key[len("module."):] if key.startswith("module.") else key
        out[key] = _to_numpy(value)
    return out


def _looks_like_state_dict(d: Mapping) -> bool:
    return any(str(k).removeprefix("module.").startswith("x_embedder.") for k in d)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


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


def convert_state_dict(sd: Mapping[str, np.ndarray], model: DiT, *, check_tables=True) -> dict:
    """Official/Latte state_dict -> {'params': ...} for `model` (float32 numpy leaves).

    Every tensor must be used and every parameter must be found, with matching shapes.
    """
    missing = [k for k in ("x_embedder.proj.weight", "final_layer.linear.weight") if k not in sd]
    if missing:
        raise ConversionError(f"not an FVDM/Latte state_dict: missing {missing}")
    used: set[str] = set()
    layout = _block_layout(sd)
    num_pairs = model.depth // 2
    have = count_blocks(sd)
    if have != model.depth:
        raise ConversionError(
            f"checkpoint has {have} blocks but model.depth={model.depth}; fix the model config"
        )
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
    used.update({"pos_embed", "temp_embed"})
    unused = sorted(set(sd) - used)
    if unused:
        raise ConversionError(f"checkpoint tensors with no place in the model: {unused[:6]}")

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
            f"parameter names differ: missing {sorted(want.keys() - got.keys())[:4]}, "
            f"unexpected {sorted(got.keys() - want.keys())[:4]} (check model.num_classes / "
            f"class_dropout_prob against the checkpoint)"
        )
    bad = {k: (got[k], want[k]) for k in want if tuple(got[k]) != tuple(want[k])}
    if bad:
        name, (g, w) = next(iter(bad.items()))
        raise ConversionError(f"shape mismatch at {name}: checkpoint {g}, model {w}")


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
