"""Exact analytic FLOP count of the video DiT (fvdm_jax.models.dit.DiT), for MFU and sizing.

Conventions:
  * One multiply-add is 2 FLOPs: a (M, K) x (K, N) matmul costs 2*M*K*N.
  * Only matmuls / einsums are counted: Dense layers and the two attention einsums (q k^T and
    attention-weights x v). Elementwise work (bias adds, residuals, modulation, GELU, SiLU,
    softmax, LayerNorm, the sin-cos features) is ignored, being O(tokens * D) against the
    O(tokens * D^2) of the matmuls. XLA's own cost analysis, which counts elementwise ops too,
    lies 0.26% above this count for the XL/2 forward; tests/test_flops.py checks that, and that
    this count equals the sum over every dot_general of the traced model exactly.
  * Counts are for ONE video (batch size 1); multiply by the batch size for a step. Everything
    is linear in the batch.

The model computes each block's adaLN modulation once per FRAME (B*F rows) and broadcasts it
over the frame's tokens. The official PyTorch model repeats the conditioning to every token of
the temporal blocks (B*T*F rows); `per_token_temporal_adaln=True` counts that form so that the
saving can be reported (about +0.91 TFLOP, +24%, on the XL forward).

This module is pure Python: it imports neither jax nor the training stack, so benchmark and
reporting scripts can use it anywhere. Only the config helpers import the model module (for
`resolve_size`), lazily, when called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Width of the sinusoidal timestep features fed to the timestep MLP; mirrors the default of
# fvdm_jax.models.embeddings.TimestepEmbedder.frequency_dim (tests check they agree).
TIMESTEP_FREQUENCY_DIM = 256

# adaLN-Zero chunks: (shift, scale, gate) for attention and for the MLP in every block; (shift,
# scale) in the final layer. Fixed by the architecture, not a knob.
BLOCK_MODULATION_CHUNKS = 6
FINAL_MODULATION_CHUNKS = 2

# Forward + backward = 3 x forward: the backward of every matmul costs two matmuls of the same
# size (the gradient with respect to the input and with respect to the weight). The usual
# convention; the real backward skips the input gradients of the patch embedding and of the
# first timestep layer (no parameter needs them), 0.0014% of an XL step.
TRAIN_STEP_FORWARD_MULTIPLIER = 3

BREAKDOWN_KEYS = (
    "patch_embed",
    "timestep_embed",
    "label_embed",
    "attention_qkv_proj",
    "attention_scores",
    "mlp",
    "adaln",
    "final_linear",
)


def _matmul(rows: int, fan_in: int, fan_out: int) -> int:
    """FLOPs of a (rows, fan_in) x (fan_in, fan_out) matmul."""
    return 2 * rows * fan_in * fan_out


def dit_forward_flops(
    *,
    input_size: int,
    patch_size: int,
    in_channels: int,
    hidden_size: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    num_frames: int,
    learn_sigma: bool = True,
    num_classes: int = 0,
    per_token_temporal_adaln: bool = False,
) -> dict[str, int]:
    """Matmul FLOPs of one DiT forward pass on one video (F, H, W, C) = (num_frames, input_size,
    input_size, in_channels).

    Returns a dict of ints (FLOPs) with the keys of BREAKDOWN_KEYS and 'total':
      patch_embed         the per-frame patch Dense, (F*T, p*p*C) -> (F*T, D)
      timestep_embed      the 2-layer timestep MLP on F frames: 256 -> D -> D
      label_embed         0: the class embedding is a table lookup
      attention_qkv_proj  the fused q/k/v Dense (D -> 3D) and the output projection (D -> D)
                          of all `depth` blocks, on every token
      attention_scores    q k^T and weights x v: spatial blocks attend over the T tokens of each
                          frame (F sequences of length T), temporal blocks over the F frames of
                          each position (T sequences of length F); 4 * S^2 * D per sequence
      mlp                 D -> mlp_ratio*D -> D in every block, on every token
      adaln               the modulation Dense D -> 6D of every block, once per frame (or, with
                          per_token_temporal_adaln, once per token in the temporal blocks), and
                          the final layer's D -> 2D once per frame
      final_linear        D -> p*p*out_channels on every token
    where T = (input_size / patch_size)^2 tokens per frame and D = hidden_size. num_heads does
    not change the count (heads split D); it is checked for divisibility only.
    """
    if input_size % patch_size:
        raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if depth % 2 or depth < 2:
        raise ValueError(f"depth={depth} must be even: it counts spatial + temporal blocks")
    del num_classes  # the label embedding is a gather: no FLOPs under this convention

    d = hidden_size
    frames = num_frames
    tokens_per_frame = (input_size // patch_size) ** 2
    tokens = frames * tokens_per_frame  # every token of the video
    mlp_dim = int(hidden_size * mlp_ratio)  # as the model: int(D * mlp_ratio)
    out_channels = in_channels * (2 if learn_sigma else 1)
    patch_dim = patch_size * patch_size * in_channels
    num_spatial = num_temporal = depth // 2

    counts = {}
    counts["patch_embed"] = _matmul(tokens, patch_dim, d)
    counts["timestep_embed"] = _matmul(frames, TIMESTEP_FREQUENCY_DIM, d) + _matmul(frames, d, d)
    counts["label_embed"] = 0
    counts["attention_qkv_proj"] = depth * (_matmul(tokens, d, 3 * d) + _matmul(tokens, d, d))
    # Per sequence of length S, summed over heads: q k^T is (S, D) x (D, S) and the weighted sum
    # of v is (S, S) x (S, D), each 2*S*S*D.
    spatial_scores = frames * 2 * _matmul(tokens_per_frame, d, tokens_per_frame)
    temporal_scores = tokens_per_frame * 2 * _matmul(frames, d, frames)
    counts["attention_scores"] = num_spatial * spatial_scores + num_temporal * temporal_scores
    counts["mlp"] = depth * (_matmul(tokens, d, mlp_dim) + _matmul(tokens, mlp_dim, d))
    temporal_adaln_rows = tokens if per_token_temporal_adaln else frames
    counts["adaln"] = (
        num_spatial * _matmul(frames, d, BLOCK_MODULATION_CHUNKS * d)
        + num_temporal * _matmul(temporal_adaln_rows, d, BLOCK_MODULATION_CHUNKS * d)
        + _matmul(frames, d, FINAL_MODULATION_CHUNKS * d)
    )
    counts["final_linear"] = _matmul(tokens, d, patch_size * patch_size * out_channels)
    counts["total"] = sum(counts[k] for k in BREAKDOWN_KEYS)
    return counts


def train_step_flops(**model_kwargs: Any) -> int:
    """FLOPs of one training step (forward + backward) per video: 3 x the forward total.

    Takes the keyword arguments of `dit_forward_flops`. The optimizer, EMA and loss are
    elementwise and not counted. Multiply by the global batch size for a step's FLOPs.
    """
    return TRAIN_STEP_FORWARD_MULTIPLIER * dit_forward_flops(**model_kwargs)["total"]


def model_kwargs_from_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `dit_forward_flops` from the `model` section of configs/default.py.

    Accepts a ConfigDict or a plain dict; the model is resolved by
    fvdm_jax.models.dit.model_from_config, so bad configs raise exactly as the model builder does.
    Keys that do not affect FLOPs (dtype, attention, remat, ...) are ignored.
    """
    from fvdm_jax.models.dit import model_from_config  # lazy: keeps this module free of jax

    model = model_from_config(model_config)
    keys = (
        "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
        "mlp_ratio", "num_frames", "learn_sigma", "num_classes",
    )
    return {key: getattr(model, key) for key in keys}


def model_flops_from_config(model_config: Mapping[str, Any]) -> int | None:
    """Forward FLOPs per video of the model described by a `model` config section; None for a
    Wan model (model.architecture='wan': not counted, so no MFU)."""
    if (model_config.get("architecture") or "dit") == "wan":
        return None
    return dit_forward_flops(**model_kwargs_from_config(model_config))["total"]


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilization in [0, 1]: achieved FLOP/s over the hardware's peak FLOP/s.

    flops_per_step: model FLOPs of one step of the whole job (e.g. train_step_flops(...) times
    the global batch); step_time_s: seconds per step; peak_flops_per_s: the peak of ALL devices
    of the job together, in the step's compute dtype.
    """
    if step_time_s <= 0 or peak_flops_per_s <= 0:
        raise ValueError(
            f"step_time_s={step_time_s} and peak_flops_per_s={peak_flops_per_s} must be positive"
        )
    return flops_per_step / step_time_s / peak_flops_per_s


# bf16 dense matmul peaks per device, for the MFU estimate when train.peak_flops_per_device is unset.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p's device_kind is plain "TPU v5" (after the "TPU v5 lite" prefix: first match wins)
    "TPU v6 lite": 918e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
    """The bf16 dense peak of a device kind (jax's device_kind), None when unknown."""
    return next((v for k, v in PEAK_FLOPS_BY_DEVICE_KIND.items() if device_kind.startswith(k)), None)
