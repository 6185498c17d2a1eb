"""Wan 2.1 VAE weights -> `fvdm_jax.models.wan_vae` parameters.

Two namings are read:

  diffusers    AutoencoderKLWan folders: config.json + diffusion_pytorch_model.safetensors (or
               sharded *.safetensors with a `*.safetensors.index.json`); a pipeline folder is
               read from its vae/ subfolder. `encoder.down_blocks.2.resample.1.weight`,
               `decoder.up_blocks.0.upsamplers.0.time_conv.weight`, `quant_conv.weight`, ...
  original     Wan-Video/Wan2.1 `WanVAE_` (the Wan2.1_VAE.pth release file, a torch state dict):
               `encoder.conv1`, `encoder.downsamples.N.residual.{0,2,3,6}` (norm1, conv1, norm2,
               conv2), `.shortcut`, `encoder.middle.{0,1,2}`, `encoder.head.{0,2}`,
               `decoder.upsamples.N` (one flat list: per level num_res_blocks + 1 resnets, then
               the resampler), `conv1` / `conv2` (quant_conv / post_quant_conv).

Our parameter `encoder/down_blocks_2/resample_1/kernel` is diffusers'
`encoder.down_blocks.2.resample.1.weight`. Torch convolutions (out, in, [t,] h, w) become
([t,] h, w, in, out); RMS-norm gammas (C, 1, 1[, 1]) become (C,). The model shape comes from the
config.json next to the weights or `config=`; without either (the original release file) it is
the Wan 2.1 VAE. Every tensor must find its place and every parameter must be found: anything
else is one ConversionError line listing the keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np

from fvdm_jax.convert.tensors import ConversionError, listed
from fvdm_jax.convert.wan import TORCH_SUFFIXES, read_wan_checkpoint
from fvdm_jax.models.wan_vae import WAN21_CONFIG, WanVAE, param_shapes, wan_vae_from_config

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
             "shortcut": "conv_shortcut"}
_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_HEAD = {"0": "norm_out", "2": "conv_out"}


# --- names --------------------------------------------------------------------------------------


def diffusers_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> diffusers' tensor name ('down_blocks_0' -> 'down_blocks.0',
    kernel -> weight)."""
    *modules, leaf = path
    names = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join([*names, "weight" if leaf == "kernel" else leaf])


def _upsample_slots(config: Mapping) -> dict[int, str]:
    """Original `decoder.upsamples.N` index -> diffusers' module path."""
    slots, n = {}, 0
    levels = len(config["dim_mult"])
    for i in range(levels):
        for j in range(config["num_res_blocks"] + 1):
            slots[n], n = f"up_blocks.{i}.resnets.{j}", n + 1
        if i != levels - 1:
            slots[n], n = f"up_blocks.{i}.upsamplers.0", n + 1
    return slots


def original_to_diffusers(key: str, config: Mapping) -> str:
    """An original Wan VAE tensor name -> diffusers' name for a model of `config` (diffusers'
    config keys); names it does not know come back unchanged (and then fail as unplaced)."""
    parts = key.split(".")
    if parts[0] in ("conv1", "conv2") and len(parts) == 2:
        return ("quant_conv." if parts[0] == "conv1" else "post_quant_conv.") + parts[1]
    if parts[0] not in ("encoder", "decoder") or len(parts) < 3:
        return key
    side, module, rest = parts[0], parts[1], parts[2:]
    if module == "conv1":
        return ".".join([side, "conv_in", *rest])
    if module == "head" and rest[0] in _HEAD:
        return ".".join([side, _HEAD[rest[0]], *rest[1:]])
    if module == "middle" and rest[0] in _MIDDLE:
        block, rest = _MIDDLE[rest[0]], rest[1:]
    elif module == "downsamples" and side == "encoder":
        block, rest = f"down_blocks.{rest[0]}", rest[1:]
    elif module == "upsamples" and side == "decoder" and rest[0].isdigit():
        slot = _upsample_slots(config).get(int(rest[0]))
        if slot is None:
            return key
        block, rest = slot, rest[1:]
    else:
        return key
    inner = ".".join(rest)
    for old, new in _RESIDUAL.items():
        if inner.startswith(old + "."):
            inner = new + inner[len(old):]
            break
    return f"{side}.{block}.{inner}"


def diffusers_to_original(name: str, config: Mapping) -> str:
    """The inverse of `original_to_diffusers` (to name tensors as an original file does)."""
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    parts = name.split(".")
    if parts[0] in top:
        return ".".join([top[parts[0]], *parts[1:]])
    side, rest = parts[0], ".".join(parts[1:])
    for new, old in (("conv_in", "conv1"), *((v, f"head.{k}") for k, v in _HEAD.items())):
        if rest.startswith(new + "."):
            return f"{side}.{old}{rest[len(new):]}"
    block = next((f"middle.{k}" for k, v in _MIDDLE.items() if rest.startswith(v + ".")), None)
    if block is not None:
        rest = rest[len(_MIDDLE[block[-1]]) + 1:]
    elif re.match(r"down_blocks\.\d+\.", rest):
        index, rest = rest.split(".", 2)[1:]
        block = f"downsamples.{index}"
    else:
        slot = next((n for n, v in _upsample_slots(config).items() if rest.startswith(v + ".")), None)
        if slot is None:
            return name
        rest = rest[len(_upsample_slots(config)[slot]) + 1:]
        block = f"upsamples.{slot}"
    for old, new in _RESIDUAL.items():
        if rest.startswith(new + "."):
            rest = old + rest[len(new):]
            break
    return f"{side}.{block}.{rest}"


def naming(sd: Mapping[str, np.ndarray]) -> str:
    """'original' when the state dict uses the Wan repository's names, else 'diffusers'."""
    original = ("encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight", "conv2.weight")
    return "original" if any(k in sd for k in original) else "diffusers"


# --- shapes and layouts ---------------------------------------------------------------------------


def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch layout of our parameter `path` of `shape`."""
    if path[-1] == "gamma":  # (C, 1, 1) in per-frame attention, (C, 1, 1, 1) elsewhere
        attention = any(m.startswith("attentions_") for m in path)
        return (shape[0], 1, 1) if attention else (shape[0], 1, 1, 1)
    if len(shape) >= 4:  # conv (..., in, out) -> (out, in, ...)
        return (shape[-1], shape[-2], *shape[:-2])
    return tuple(shape)


def from_torch(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A torch-layout tensor -> our layout of `shape`."""
    if len(shape) >= 4:
        spatial = tuple(range(2, value.ndim))
        return value.transpose(*spatial, 1, 0)
    return value.reshape(shape)


def tensor_shapes(vae: WanVAE, shapes: dict | None = None) -> dict[str, tuple[int, ...]]:
    """{diffusers tensor name: torch-layout shape} of every parameter of `vae`."""
    shapes = param_shapes(vae) if shapes is None else shapes
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    out = {}
    for path, leaf in flat:
        keys = tuple(k.key for k in path)
        out[diffusers_name(keys)] = torch_shape(keys, tuple(leaf.shape))
    return out


def convert_state_dict(sd: Mapping[str, np.ndarray], vae: WanVAE, dtype: str | None = None,
                       names: str = "diffusers", config: Mapping | None = None) -> dict:
    """A state dict (diffusers' or, with names='original' and the diffusers `config`, the original
    names; `config` missing keys are Wan 2.1's) -> {'params': ...} numpy tree in `dtype`
    (default: vae.param_dtype).

    Unplaced or missing tensors, or wrong shapes: ConversionError naming the keys as the file
    does."""
    shown, config = {}, {**WAN21_CONFIG, **(config or {})}
    if names == "original":
        renamed = {}
        for key, value in sd.items():
            name = original_to_diffusers(key, config)
            if name in renamed:
                raise ConversionError(f"two keys, one of them {key!r}, both name {name!r}")
            renamed[name], shown[name] = value, key
        sd = renamed

    def show(name):  # the file's own name of a tensor
        if names == "original":
            return shown.get(name) or diffusers_to_original(name, config)
        return name

    shapes = param_shapes(vae)
    wanted = tensor_shapes(vae, shapes)
    unplaced = [show(k) for k in sd if k not in wanted]
    if unplaced:
        raise ConversionError(f"{len(unplaced)} tensors have no place in the Wan 2.1 VAE: "
                              f"{listed(unplaced)}; check that the config matches the weights")
    missing = [show(k) for k in wanted if k not in sd]
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensors the Wan 2.1 VAE needs: "
                              f"{listed(missing)}; check that the config matches the weights")
    wrong = [f"{show(k)} {tuple(np.shape(sd[k]))} (expected {s})" for k, s in wanted.items()
             if tuple(np.shape(sd[k])) != s]
    if wrong:
        raise ConversionError(f"{len(wrong)} tensors do not fit the Wan VAE's shapes: "
                              f"{listed(wrong, 6)}; check that the config matches the weights")
    target = DTYPES[dtype] if dtype is not None else np.dtype(vae.param_dtype)

    def convert(path, leaf):
        value = np.asarray(sd[diffusers_name(tuple(k.key for k in path))])
        value = value.astype(np.float32) if value.dtype != target else value
        return np.ascontiguousarray(from_torch(value, leaf.shape), dtype=target)

    return {"params": jax.tree_util.tree_map_with_path(convert, shapes["params"])}


# --- files ----------------------------------------------------------------------------------------


def _weights_path(path: str) -> str:
    """A pipeline folder's vae/ subfolder; a folder holding one torch file (and no safetensors):
    that file; anything else unchanged."""
    if not os.path.isdir(path):
        return path
    names = os.listdir(path)
    if "vae" in names and os.path.isdir(os.path.join(path, "vae")) and not any(
            n.endswith(".safetensors") for n in names):
        return _weights_path(os.path.join(path, "vae"))
    torch_files = [n for n in names if n.endswith(TORCH_SUFFIXES)]
    if not any(n.endswith(".safetensors") for n in names) and len(torch_files) == 1:
        return os.path.join(path, torch_files[0])
    return path


def read_wan_vae(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
    """(flat state dict, config.json next to the weights or None) of a Wan VAE checkpoint: a
    diffusers folder (sharded or not), a pipeline folder, or one .safetensors / .pth file."""
    return read_wan_checkpoint(_weights_path(path))


def convert_wan_vae(path: str, *, config: Mapping | None = None, dtype: str | None = None,
                    **overrides) -> tuple[dict, dict]:
    """(params {'params': ...}, diffusers config dict) of the Wan 2.1 VAE at `path`.

    The config is `config`, else the config.json next to the weights, else the Wan 2.1 VAE's
    (WAN21_CONFIG); `wan_vae_from_config(config_dict, **overrides)` builds the matching module.
    dtype: 'float32' (default), 'bfloat16' or 'float16' for the parameters."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"Wan VAE dtype={dtype!r} is not one of {list(DTYPES)}")
    sd, found = read_wan_vae(path)
    config = dict(config if config is not None else found if found is not None else WAN21_CONFIG)
    try:
        vae = wan_vae_from_config(config, **overrides)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path}: {e}") from None
    full = {**WAN21_CONFIG, **config}  # the defaults diffusers fills in for missing keys
    params = convert_state_dict(sd, vae, dtype, naming(sd), full)
    return params, config
