"""A diffusers AutoencoderKL checkpoint folder -> the `fvdm_jax.models.vae` module and parameters.

A folder holds config.json and diffusion_pytorch_model.safetensors (or .bin, a torch pickle read
with `torch.load(weights_only=True)` when torch is installed; `variant='fp16'` picks
diffusion_pytorch_model.fp16.*). A pipeline folder with a vae/ subfolder works too.

.safetensors files are read by fvdm_jax/convert/tensors.py (no safetensors or torch needed).

Names: our parameter `encoder/down_blocks_0/resnets_1/conv1/kernel` is diffusers'
`encoder.down_blocks.0.resnets.1.conv1.weight`; `attentions_0/to_out` is `attentions.0.to_out.0`.
Older diffusers checkpoints (sd-vae-ft-ema/mse among them) name the mid-block attention
query/key/value/proj_attn, sometimes as 1x1 conv weights (out, in, 1, 1); both are accepted.
Torch conv weights are (out, in, kh, kw) -> our (kh, kw, in, out); Linear (out, in) -> (in, out).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.convert.tensors import ConversionError, read_safetensors
from fvdm_jax.models.vae import AutoencoderKL, vae_from_config

CONFIG_FILE = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
WEIGHT_EXTENSIONS = (".safetensors", ".bin")

# Old diffusers attention names -> current ones (diffusers' _fix_state_dict_keys_on_load).
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_WEIGHT = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")

# --- reading a checkpoint folder ------------------------------------------------------------------


def read_weights(path: str) -> dict[str, np.ndarray]:
    """A .safetensors or torch .bin state_dict file -> {name: numpy array}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(".bin"):
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"{path} is a torch pickle and needs torch (pip install torch), or convert it "
                f"to {WEIGHTS_STEM}.safetensors"
            ) from None
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return {
            k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy()
            for k, v in sd.items()
            if hasattr(v, "detach")
        }
    raise ConversionError(f"unknown weights file type {path!r}: use .safetensors or .bin")


def find_vae_files(folder: str, variant: str | None = None) -> tuple[str, str]:
    """(config.json, weights file) of a diffusers VAE folder, or of a pipeline's vae/ subfolder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"VAE folder {folder} does not exist")
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)) and os.path.isdir(
        os.path.join(folder, "vae")
    ):
        folder = os.path.join(folder, "vae")
    config = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config):
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_FILE}: pass a diffusers AutoencoderKL folder "
            f"({CONFIG_FILE} + {WEIGHTS_STEM}.safetensors)"
        )
    stem = f"{WEIGHTS_STEM}.{variant}" if variant else WEIGHTS_STEM
    candidates = [os.path.join(folder, stem + ext) for ext in WEIGHT_EXTENSIONS]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        names = " or ".join(os.path.basename(c) for c in candidates)
        raise FileNotFoundError(f"{folder} has no weights file: expected {names}")
    return config, found


def read_config(path: str) -> dict:
    """config.json -> dict, with a one-line error for a file that is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return config


# --- names and layouts ----------------------------------------------------------------------------


def normalize_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames legacy attention tensors (query/key/value/proj_attn) and squeezes 1x1 conv-shaped
    attention weights (out, in, 1, 1) to Linear (out, in)."""
    out = {}
    for name, value in sd.items():
        parts = name.split(".")
        if (
            len(parts) >= 3
            and parts[-3] == "0"
            and parts[-2] in LEGACY_ATTENTION_NAMES
            and "attentions" in parts
        ):
            name = ".".join(parts[:-2] + [LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
        value = np.asarray(value)
        if _ATTENTION_WEIGHT.search(name) and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        if name in out:
            raise ConversionError(f"checkpoint holds {name!r} under both its old and new name")
        out[name] = value
    return out


def diffusers_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> diffusers' tensor name ('down_blocks_0' -> 'down_blocks.0')."""
    *modules, leaf = path
    names = []
    for module in modules:
        names.append("to_out.0" if module == "to_out" else re.sub(r"_(\d+)$", r".\1", module))
    names.append("bias" if leaf == "bias" else "weight")
    return ".".join(names)


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:  # conv (kh, kw, in, out) -> (out, in, kh, kw)
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:  # Linear (in, out) -> (out, in)
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def _to_torch(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
        return value.T
    return value


def param_shapes(vae: AutoencoderKL) -> dict:
    """{'params': tree of ShapeDtypeStruct} of `vae`, without allocating anything."""
    f = vae.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, vae.in_channels), jnp.float32)
    return jax.eval_shape(vae.init, jax.random.key(0), x)


def diffusers_tensor_shapes(
    vae: AutoencoderKL, shapes: dict | None = None
) -> dict[str, tuple[int, ...]]:
    """{diffusers tensor name: torch-layout shape} of every parameter of `vae`."""
    shapes = param_shapes(vae) if shapes is None else shapes
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return {
        diffusers_name(tuple(k.key for k in path)): _torch_shape(leaf.shape) for path, leaf in flat
    }


def _listing(names) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


def convert_state_dict(sd: Mapping[str, np.ndarray], vae: AutoencoderKL) -> dict:
    """diffusers AutoencoderKL state_dict -> {'params': ...} numpy tree in vae.param_dtype.

    Every tensor must be used and every parameter found with the matching shape.
    """
    sd = normalize_state_dict(sd)
    shapes = param_shapes(vae)
    wanted = diffusers_tensor_shapes(vae, shapes)
    missing = set(wanted) - set(sd)
    if missing:
        raise ConversionError(
            f"checkpoint lacks {len(missing)} tensors the model needs: {_listing(missing)}; check "
            f"that config.json (block_out_channels, layers_per_block, ...) matches the weights"
        )
    extra = set(sd) - set(wanted)
    if extra:
        raise ConversionError(
            f"checkpoint has {len(extra)} tensors the model does not use: {_listing(extra)}; check "
            f"that config.json (block_out_channels, layers_per_block, ...) matches the weights"
        )
    for name, shape in wanted.items():
        if tuple(sd[name].shape) != shape:
            raise ConversionError(
                f"{name}: checkpoint shape {tuple(sd[name].shape)} != expected {shape} "
                f"(torch layout); config.json does not match the weights"
            )
    dtype = np.dtype(vae.param_dtype)

    def convert(path, leaf):
        value = _from_torch(sd[diffusers_name(tuple(k.key for k in path))])
        return np.ascontiguousarray(value, dtype=dtype)

    return {"params": jax.tree_util.tree_map_with_path(convert, shapes["params"])}


def to_diffusers_state_dict(params) -> dict[str, np.ndarray]:
    """Inverse of `convert_state_dict`: our parameters ({'params': ...} or the bare tree) ->
    diffusers names and torch layouts, float32."""
    params = params["params"] if "params" in params else params
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        diffusers_name(tuple(k.key for k in path)): _to_torch(np.asarray(leaf, np.float32))
        for path, leaf in flat
    }


def load_diffusers_vae(
    folder: str, *, variant: str | None = None, **overrides
) -> tuple[AutoencoderKL, dict]:
    """Builds the module from FOLDER/config.json and converts its weights.

    overrides: module fields such as dtype, param_dtype, attention. Returns (vae, {'params': ...})
    with numpy leaves in vae.param_dtype (put them on devices with the sharding you want).
    """
    config_path, weights_path = find_vae_files(folder, variant)
    try:
        vae = vae_from_config(read_config(config_path), **overrides)
    except ValueError as e:
        raise ConversionError(f"{config_path}: {e}") from None
    return vae, convert_state_dict(read_weights(weights_path), vae)
