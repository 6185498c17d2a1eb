"""Wan LoRA files -> the adapter leaves of fvdm_jax/models/lora.py, and back.

Read: a safetensors (or torch) file of LoRA weights named as peft / diffusers write them for
WanTransformer3DModel (`[transformer.|base_model.model.]blocks.{i}.attn1.to_q.lora_A.weight`,
A (r, in), B (out, r)) or as Wan's original / Kijai / ComfyUI names (Pusa's published LoRA:
`[diffusion_model.]blocks.{i}.self_attn.q.lora_down.weight`, `lora_up`, optional `.alpha`).
Returns the adapter tree {'blocks': {'self_attn': {'q': {'lora_down', 'lora_up'}}, ...}}
(stacked over layers as the scanned model holds them), the rank, the alpha the file states (None
when it has none: peft keeps it in adapter_config.json) and the targets it covers. Anything else
in the file, a layer that is missing or a rank that differs: one ConversionError line.
Write: `adapter_state_dict` gives the original (Kijai) names Pusa's tooling loads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from fvdm_jax.convert.tensors import ConversionError, listed, read_safetensors, to_numpy
from fvdm_jax.models.lora import WAN_TARGETS

# diffusers module -> ours, and Wan's original module -> ours.
DIFFUSERS_MODULES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k",
                     "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
                     "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                     "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
                     "ffn.net.0.proj": "ffn.fc1", "ffn.net.2": "ffn.fc2"}
ORIGINAL_MODULES = {"self_attn.q": "self_attn.q", "self_attn.k": "self_attn.k",
                    "self_attn.v": "self_attn.v", "self_attn.o": "self_attn.o",
                    "cross_attn.q": "cross_attn.q", "cross_attn.k": "cross_attn.k",
                    "cross_attn.v": "cross_attn.v", "cross_attn.o": "cross_attn.o",
                    "ffn.0": "ffn.fc1", "ffn.2": "ffn.fc2"}
PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.")
KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
ALPHA = re.compile(r"^blocks\.(\d+)\.(.+)\.alpha$")


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_lora_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: to_numpy(v) for k, v in state.items()}


def _out_dims(target: str, dim: int, num_heads: int, ffn_dim: int) -> tuple[int, ...]:
    layer = target.split(".")[-1]
    if layer in "qkv":
        return (num_heads, dim // num_heads)
    return (ffn_dim,) if layer == "fc1" else (dim,)


def _in_dims(target: str, dim: int, num_heads: int, ffn_dim: int) -> tuple[int, ...]:
    layer = target.split(".")[-1]
    if layer == "o":
        return (num_heads, dim // num_heads)
    return (ffn_dim,) if layer == "fc2" else (dim,)


def adapters_from_state_dict(sd: Mapping[str, np.ndarray], *, num_layers: int, dim: int,
                             num_heads: int, ffn_dim: int):
    """(adapter tree, rank, alpha or None, targets) of a LoRA state dict (module docstring)."""
    found, alphas, unplaced = {}, set(), []
    for raw, value in sd.items():
        key = _strip(raw)
        if (m := ALPHA.match(key)) is not None:
            alphas.add(float(np.asarray(value).reshape(())))
            continue
        m = KEY.match(key)
        module = m and (DIFFUSERS_MODULES.get(m.group(2)) or ORIGINAL_MODULES.get(m.group(2)))
        if not module:
            unplaced.append(raw)
            continue
        side = "down" if m.group(3) in ("lora_A", "lora_down") else "up"
        found[(module, int(m.group(1)), side)] = np.asarray(value)
    if unplaced:
        raise ConversionError(f"the LoRA file has tensors no Wan adapter takes: {listed(unplaced)}")
    if not found:
        raise ConversionError("the LoRA file holds no Wan adapter (lora_A / lora_down) tensors")
    if len(alphas) > 1:
        raise ConversionError(f"the LoRA file states several alphas {sorted(alphas)}; one is supported")
    ranks = {v.shape[0] if side == "down" else v.shape[1] for (_, _, side), v in found.items()}
    if len(ranks) != 1:
        raise ConversionError(f"the LoRA file mixes ranks {sorted(ranks)}; one is supported")
    rank = ranks.pop()
    targets = tuple(t for t in WAN_TARGETS if any(k[0] == t for k in found))
    missing = [f"blocks.{i}.{t}.{side}" for t in targets for i in range(num_layers)
               for side in ("down", "up") if (t, i, side) not in found]
    if missing:
        raise ConversionError(f"the LoRA file lacks {listed(missing)} (a model of {num_layers} "
                              f"layers takes every layer's adapter)")
    tree = {}
    for target in targets:
        ins = _in_dims(target, dim, num_heads, ffn_dim)
        outs = _out_dims(target, dim, num_heads, ffn_dim)
        down = np.stack([found[(target, i, "down")] for i in range(num_layers)])  # (L, r, in)
        up = np.stack([found[(target, i, "up")] for i in range(num_layers)])  # (L, out, r)
        if down.shape[2] != int(np.prod(ins)) or up.shape[1] != int(np.prod(outs)):
            raise ConversionError(f"the LoRA of {target} is {down.shape[2]} -> {up.shape[1]} wide "
                                  f"but the model's layer is {int(np.prod(ins))} -> "
                                  f"{int(np.prod(outs))}")
        module, layer = target.split(".")
        tree.setdefault(module, {})[layer] = {
            "lora_down": down.transpose(0, 2, 1).reshape((num_layers,) + ins + (rank,)),
            "lora_up": up.transpose(0, 2, 1).reshape((num_layers, rank) + outs),
        }
    return {"blocks": tree}, int(rank), (alphas.pop() if alphas else None), targets


def with_adapters(params, adapters):
    """{'params': ...} with the adapter leaves inserted beside their kernels (a new tree)."""
    def insert(base, extra):
        out = dict(base)
        for key, value in extra.items():
            out[key] = insert(base[key], value) if isinstance(value, dict) else value
        return out

    inner = params["params"] if set(params) == {"params"} else params
    return {"params": insert(inner, adapters)}


def adapter_state_dict(params, alpha: float) -> dict[str, np.ndarray]:
    """The adapters of {'params': ...} under Wan's original names (Pusa / Kijai / ComfyUI):
    diffusion_model.blocks.{i}.<module>.lora_down.weight (r, in), lora_up (out, r), .alpha."""
    inner = params["params"] if set(params) == {"params"} else params
    names = {v: k for k, v in ORIGINAL_MODULES.items()}
    out = {}
    for module, layers in inner["blocks"].items():
        for layer, leaves in layers.items() if isinstance(layers, dict) else ():
            if not isinstance(leaves, dict) or "lora_down" not in leaves:
                continue
            down, up = np.asarray(leaves["lora_down"]), np.asarray(leaves["lora_up"])
            num_layers, rank = down.shape[0], down.shape[-1]
            down = down.reshape(num_layers, -1, rank).transpose(0, 2, 1)
            up = up.reshape(num_layers, rank, -1).transpose(0, 2, 1)
            for i in range(num_layers):
                stem = f"diffusion_model.blocks.{i}.{names[f'{module}.{layer}']}"
                out[f"{stem}.lora_down.weight"] = np.ascontiguousarray(down[i])
                out[f"{stem}.lora_up.weight"] = np.ascontiguousarray(up[i])
                out[f"{stem}.alpha"] = np.asarray(alpha, np.float32)
    return out


def merge_lora_file(params, model_config, path: str, *, alpha: float | None = None,
                    strength: float = 1.0):
    """A plain Wan's {'params': ...} with the LoRA file at `path` folded in at `strength`:
    W + strength * alpha / r A B (alpha: the file's, else `alpha`, else r)."""
    from fvdm_jax.models.lora import LoRA, merge

    model_config = dict(model_config)
    sizes = {k: int(model_config[k]) for k in ("num_layers", "dim", "num_heads", "ffn_dim")}
    adapters, rank, stored, targets = adapters_from_state_dict(read_lora_file(path), **sizes)
    alpha = stored if stored is not None else (rank if alpha is None else float(alpha))
    return merge(with_adapters(params, adapters), LoRA(rank, float(alpha) * float(strength), targets))
