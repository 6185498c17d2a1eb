"""Exact analytic FLOP count of the video DiT (fvdm_jax.models.dit.DiT) and of the Wan 2.1 DiT
(fvdm_jax.models.wan.Wan, with or without LoRA adapters), for MFU and sizing.

Conventions:
  * One multiply-add is 2 FLOPs: a (M, K) x (K, N) matmul costs 2*M*K*N.
  * Only matmuls / einsums are counted: Dense layers and the two attention einsums (q k^T and
    attention-weights x v). Elementwise work (bias adds, residuals, modulation, GELU, SiLU,
    softmax, LayerNorm, the sin-cos features) is ignored, being O(tokens * D) against the
    O(tokens * D^2) of the matmuls. XLA's own cost analysis, which counts elementwise ops too,
    lies 0.26% above this count for the XL/2 forward (0.2% at Wan 1.3B's widths);
    tests/test_flops.py checks that, and that this count equals the sum over every dot_general of
    the traced model exactly.
  * Counts are for ONE video (batch size 1); multiply by the batch size for a step. Everything
    is linear in the batch.

The DiT computes each block's adaLN modulation once per FRAME (B*F rows) and broadcasts it
over the frame's tokens. The official PyTorch model repeats the conditioning to every token of
the temporal blocks (B*T*F rows); `per_token_temporal_adaln=True` counts that form so that the
saving can be reported (about +0.91 TFLOP, +24%, on the XL forward).

Wan (`wan_forward_flops`) runs its time embedding and time projection once per latent FRAME
(per-frame timesteps), its text embedding once per video on the L text tokens, and every block on
all S = F*h*w/(ph*pw) tokens of the video (self-attention over S x S, cross-attention S x L).
Its training step (`wan_train_step_flops`) follows the DiT's 3 x forward convention for full
training; a LoRA run (lora_rank > 0) counts what its step computes instead (the frozen weights
get no gradients, the attention einsums still need theirs: 2.7 x forward for the 1.3B model at
21 x 60 x 104 latents; see there).

This module is pure Python: it imports neither jax nor the training stack, so benchmark and
reporting scripts can use it anywhere. Only the config helpers import the model modules (to
resolve a config exactly as the model builders do), lazily, when called.
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


# --- Wan 2.1 ---------------------------------------------------------------------------------

# The layers LoRA can adapt; mirrors fvdm_jax.models.lora.WAN_TARGETS (tests check they agree).
WAN_LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                    "ffn.fc1", "ffn.fc2")
# Wan's time projection: 6 modulation vectors per frame (shift, scale, gate of the self-attention
# and of the FFN), as the DiT's adaLN-Zero chunks.
WAN_MODULATION_CHUNKS = 6

WAN_BREAKDOWN_KEYS = (
    "patch_embed",
    "time_embed",
    "time_projection",
    "text_embed",
    "self_attn_proj",
    "self_attn_scores",
    "cross_attn_proj",
    "cross_attn_scores",
    "ffn",
    "head",
    "lora",
)


def _wan_shapes(num_frames, latent_size, patch_size, dim, num_heads, text_length, lora_targets):
    """(S tokens, ph, pw, LoRA targets), after the model's checks (as ValueErrors)."""
    height, width = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    pt, ph, pw = (int(p) for p in patch_size)
    if pt != 1:
        raise ValueError(f"patch_size={tuple(patch_size)}: Wan's per-frame timesteps need a "
                         f"temporal patch of 1")
    if height % ph or width % pw:
        raise ValueError(f"latent size {height} x {width} is not divisible by the patch {ph} x {pw}")
    if dim % num_heads:
        raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    if min(num_frames, height, width, text_length) <= 0:
        raise ValueError(f"num_frames={num_frames}, latent size {height} x {width} and "
                         f"text_length={text_length} must be positive")
    targets = tuple(lora_targets or WAN_LORA_TARGETS)  # empty = all, as the model's LoRA
    unknown = sorted(set(targets) - set(WAN_LORA_TARGETS))
    if unknown:
        raise ValueError(f"lora_targets has {unknown}; choose from {WAN_LORA_TARGETS}")
    tokens = num_frames * (height // ph) * (width // pw)
    return tokens, ph, pw, targets


def _wan_block_linears(tokens: int, text_length: int, dim: int, ffn_dim: int):
    """(name, rows, fan_in, fan_out) of every linear layer of one Wan block, by LoRA name."""
    s, n_text, d = tokens, text_length, dim
    return (
        ("self_attn.q", s, d, d), ("self_attn.k", s, d, d), ("self_attn.v", s, d, d),
        ("self_attn.o", s, d, d),
        ("cross_attn.q", s, d, d), ("cross_attn.k", n_text, d, d), ("cross_attn.v", n_text, d, d),
        ("cross_attn.o", s, d, d),
        ("ffn.fc1", s, d, ffn_dim), ("ffn.fc2", s, ffn_dim, d),
    )


def wan_forward_flops(
    *,
    num_frames: int,
    latent_size: int | tuple[int, int],
    text_length: int,
    dim: int,
    ffn_dim: int,
    num_heads: int,
    num_layers: int,
    freq_dim: int = 256,
    text_dim: int = 4096,
    in_channels: int = 16,
    out_channels: int | None = None,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] | None = None,
) -> dict[str, int]:
    """Matmul FLOPs of one Wan forward pass on one video: latents (F, H, W, C) = (num_frames,
    *latent_size, in_channels) and a context of `text_length` tokens of width text_dim.

    Returns a dict of ints (FLOPs) with the keys of WAN_BREAKDOWN_KEYS and 'total':
      patch_embed        the (1, ph, pw) patch Dense, (S, ph*pw*C) -> (S, D)
      time_embed         the time MLP freq_dim -> D -> D, once per frame (F rows)
      time_projection    D -> 6D, once per frame
      text_embed         the text MLP text_dim -> D -> D on the L tokens
      self_attn_proj     q, k, v, o (D -> D) on the S tokens, in every block
      self_attn_scores   q k^T and weights x v over all S tokens: 4 * S^2 * D per block
      cross_attn_proj    q, o (D -> D) on the S tokens and k, v (D -> D) on the L text tokens
      cross_attn_scores  q k^T and weights x v of S queries on L keys: 4 * S * L * D per block
      ffn                D -> ffn_dim -> D on the S tokens, in every block
      head               D -> ph*pw*out_channels on the S tokens
      lora               the adapters (x A) B of the targeted layers when lora_rank > 0:
                         2 * rows * rank * (fan_in + fan_out) each, rows = L for cross_attn.k/v
    where S = F * (H/ph) * (W/pw) tokens and D = dim. num_heads does not change the count (heads
    split D); out_channels None = in_channels (as the model); lora_targets None or empty = every
    target (as the model's LoRA). The LoRA scale (alpha / rank) is elementwise: not counted.
    """
    tokens, ph, pw, targets = _wan_shapes(num_frames, latent_size, patch_size, dim, num_heads,
                                          text_length, lora_targets)
    if lora_rank < 0:
        raise ValueError(f"lora_rank={lora_rank} must be >= 0 (0 = no adapters)")
    d, s, f, n_text = dim, tokens, num_frames, text_length
    out_channels = out_channels or in_channels
    counts = {}
    counts["patch_embed"] = _matmul(s, ph * pw * in_channels, d)
    counts["time_embed"] = _matmul(f, freq_dim, d) + _matmul(f, d, d)
    counts["time_projection"] = _matmul(f, d, WAN_MODULATION_CHUNKS * d)
    counts["text_embed"] = _matmul(n_text, text_dim, d) + _matmul(n_text, d, d)
    counts["self_attn_proj"] = num_layers * 4 * _matmul(s, d, d)
    counts["self_attn_scores"] = num_layers * 2 * _matmul(s, d, s)
    counts["cross_attn_proj"] = num_layers * 2 * (_matmul(s, d, d) + _matmul(n_text, d, d))
    counts["cross_attn_scores"] = num_layers * 2 * _matmul(s, d, n_text)
    counts["ffn"] = num_layers * (_matmul(s, d, ffn_dim) + _matmul(s, ffn_dim, d))
    counts["head"] = _matmul(s, d, ph * pw * out_channels)
    counts["lora"] = 0
    if lora_rank:
        counts["lora"] = num_layers * sum(
            _matmul(rows, fan_in, lora_rank) + _matmul(rows, lora_rank, fan_out)
            for name, rows, fan_in, fan_out in _wan_block_linears(s, n_text, d, ffn_dim)
            if name in targets
        )
    counts["total"] = sum(counts[k] for k in WAN_BREAKDOWN_KEYS)
    return counts


def _wan_lora_backward_flops(*, num_frames, latent_size, text_length, dim, ffn_dim, num_heads,
                             num_layers, in_channels=16, out_channels=None,
                             patch_size=(1, 2, 2), lora_rank, lora_targets=None, **_) -> int:
    """Backward matmul FLOPs of a LoRA step (gradients of the adapters only); see
    wan_train_step_flops."""
    tokens, ph, pw, targets = _wan_shapes(num_frames, latent_size, patch_size, dim, num_heads,
                                          text_length, lora_targets)
    s, n_text, r = tokens, text_length, lora_rank
    block = 0
    for name, rows, fan_in, fan_out in _wan_block_linears(s, n_text, dim, ffn_dim):
        from_text = name in ("cross_attn.k", "cross_attn.v")  # their input: the text tokens
        if not from_text:  # the gradient of the layer's input (its frozen weight gets none)
            block += _matmul(rows, fan_in, fan_out)
        if name in targets:
            # B's gradient and the gradient of x A (both rows x r x fan_out), A's gradient
            # (rows x fan_in x r), and the gradient of the input through A unless it is the text.
            block += 2 * _matmul(rows, r, fan_out) + _matmul(rows, fan_in, r)
            if not from_text:
                block += _matmul(rows, fan_in, r)
    # Self-attention: the gradients of q, k and v through both einsums, 2 x their forward.
    block += 2 * 2 * _matmul(s, dim, s)
    # Cross-attention: q's and the weights' gradients always; k's / v's only when adapted.
    cross = _matmul(s, dim, n_text)
    block += 2 * cross + cross * (("cross_attn.k" in targets) + ("cross_attn.v" in targets))
    out_channels = out_channels or in_channels
    return num_layers * block + _matmul(s, dim, ph * pw * out_channels)  # + the head's input


def wan_train_step_flops(**model_kwargs: Any) -> int:
    """FLOPs of one Wan training step (forward + backward) per video. Takes the keyword
    arguments of `wan_forward_flops`.

    Full training (lora_rank 0): 3 x the forward total, the DiT's convention (train_step_flops);
    the real backward skips the input gradients of the patch embedding, of the first time layer
    and of the first text layer (data and fixed features: nothing upstream needs them).

    LoRA (lora_rank > 0): the frozen weights get no gradients, so the step computes the forward,
    the gradient of the activations back through the head and the blocks (every layer's input
    gradient, the attention einsums' gradients) and the adapters' own gradients; nothing flows
    back into the frozen patch, time or text embeddings, nor into the text tokens through the
    cross-attention k / v (their adapters get their weight gradients only). This counts exactly
    those matmuls (tests/test_flops.py checks it against the traced gradient of the adapters), so
    a LoRA run's MFU is the share of the peak its step really uses, not 3 x forward's nominal
    figure. It lies between 2 x and 3 x forward: the attention einsums have no weights, so their
    backward is all activation gradients (2 x theirs); at 21 x 60 x 104 latents and 512 text
    tokens, where self-attention's einsums are 70% (1.3B) / 52% (14B) of the forward, a LoRA step
    is 2.71 x / 2.53 x forward at rank 16. (Under nn.scan the first block also computes the
    gradient of its input, as every block does; it is counted.)
    """
    forward = wan_forward_flops(**model_kwargs)["total"]
    if not model_kwargs.get("lora_rank"):
        return TRAIN_STEP_FORWARD_MULTIPLIER * forward
    return forward + _wan_lora_backward_flops(**model_kwargs)


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


def wan_kwargs_from_config(
    model_config: Mapping[str, Any],
    *,
    video_shape: tuple[int, ...] | None = None,
    text_length: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `wan_forward_flops` from a Wan `model` config section: the training
    config's (model.wan sub-section) or the flat dict of wan_model_config / build.with_lora
    (lora_rank, lora_targets), resolved by build.model_from_config, so bad configs raise as the
    model builder does.

    video_shape: the latents of one example, (F, H, W) or (F, H, W, C) (the data's); None =
    (model.num_frames, *model.wan.latent_size). text_length: tokens of the context (the data's;
    no default: ValueError when None).
    """
    from fvdm_jax.models.build import flat_model_config, model_from_config  # lazy: no jax here

    model = model_from_config(model_config)
    if video_shape is None:
        flat = flat_model_config(model_config)
        frames, size = flat.get("num_frames"), flat.get("latent_size")
        if frames is None or size is None:
            raise ValueError("the Wan FLOP count needs the latent shape: pass video_shape or set "
                             "model.num_frames and model.wan.latent_size")
        video_shape = (int(frames), *(int(v) for v in size))
    if text_length is None:
        raise ValueError("the Wan FLOP count needs the text length (tokens of the context)")
    return dict(
        num_frames=int(video_shape[0]), latent_size=(int(video_shape[1]), int(video_shape[2])),
        text_length=int(text_length), dim=model.dim, ffn_dim=model.ffn_dim,
        num_heads=model.num_heads, num_layers=model.num_layers, freq_dim=model.freq_dim,
        text_dim=model.text_dim, in_channels=model.in_channels, out_channels=model.out_channels,
        patch_size=tuple(model.patch_size), lora_rank=model.lora.rank,
        lora_targets=tuple(model.lora.targets),
    )


def _is_wan(model_config: Mapping[str, Any]) -> bool:
    return (model_config.get("architecture") or "dit") == "wan"


def model_flops_from_config(
    model_config: Mapping[str, Any],
    *,
    video_shape: tuple[int, ...] | None = None,
    text_length: int | None = None,
) -> int:
    """Forward FLOPs per video of the model described by a `model` config section.

    A DiT's count needs nothing else (its input shape is in the config). A Wan model's needs the
    data's latent shape and text length: see `wan_kwargs_from_config`. A flat Wan config with
    LoRA keys (build.with_lora) counts the adapters too.
    """
    if _is_wan(model_config):
        kwargs = wan_kwargs_from_config(model_config, video_shape=video_shape,
                                        text_length=text_length)
        return wan_forward_flops(**kwargs)["total"]
    return dit_forward_flops(**model_kwargs_from_config(model_config))["total"]


def train_step_flops_from_config(
    model_config: Mapping[str, Any],
    lora_config: Mapping[str, Any] | None = None,
    *,
    video_shape: tuple[int, ...] | None = None,
    text_length: int | None = None,
) -> int:
    """FLOPs of one training step per video (forward + backward) of a `model` config section
    and the run's `lora` section: `train_step_flops` for a DiT (3 x forward),
    `wan_train_step_flops` for Wan (3 x forward, or the LoRA step's count when lora.rank > 0).
    video_shape and text_length as for `model_flops_from_config`."""
    if not _is_wan(model_config):
        return TRAIN_STEP_FORWARD_MULTIPLIER * model_flops_from_config(model_config)
    from fvdm_jax.models.build import with_lora  # lazy: no jax here

    kwargs = wan_kwargs_from_config(with_lora(model_config, lora_config),
                                    video_shape=video_shape, text_length=text_length)
    return wan_train_step_flops(**kwargs)


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
