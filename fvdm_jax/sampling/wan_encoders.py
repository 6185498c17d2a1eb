"""Wan 2.1's VAE and UMT5 text encoder from the `encoders` config section, as --mode=encode and
--mode=sample use them.

`WanVideoVAE(encoders)`: encoders.vae (a diffusers AutoencoderKLWan folder, a pipeline folder
with vae/, or the original Wan2.1_VAE.pth) -> `encode(pixels)` normalised latents (what the DiT
trains on) and `decode(latents)` pixels in [-1, 1]. `WanTextEncoder(encoders)`: encoders.text (a
transformers UMT5 encoder folder, a pipeline folder with text_encoder/, or Wan's
models_t5_umt5-xxl-enc-bf16.pth) with the tokenizer of encoders.tokenizer (None: spiece.model in
encoders.text's folder or the folder above it, the diffusers and Wan layouts) -> `encode(prompts)`
the hidden states of each prompt's real tokens (its pieces and EOS; Wan and diffusers cut the
padding off the same way), and `padded(prompts)` those zero-padded to encoders.text_length, as
Wan pads its prompts.

Both run jitted on the default device (one compilation per input shape), parameters as the
converters give them (the UMT5 release's bf16 stays bf16), matmuls in encoders.dtype.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fvdm_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(encoders: Mapping[str, Any]):
    name = encoders.get("dtype") or "float32"
    if name not in DTYPES:
        raise ConfigError(f"encoders.dtype={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _path(encoders: Mapping[str, Any], key: str, what: str) -> str:
    path = encoders.get(key)
    if not path:
        raise ConfigError(f"encoders.{key} is not set: {what}")
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise ConfigError(f"encoders.{key}={path} does not exist: {what}")
    return path


class WanVideoVAE:
    """The Wan 2.1 VAE of encoders.vae: pixels <-> normalised latents (B, 1 + k, h, w, z_dim)."""

    def __init__(self, encoders: Mapping[str, Any], latent_channels: int | None = None):
        from fvdm_jax.convert.wan_vae import convert_wan_vae
        from fvdm_jax.models import wan_vae

        self.path = _path(encoders, "vae", "point it at a diffusers AutoencoderKLWan folder or "
                                           "Wan2.1_VAE.pth")
        params, config = convert_wan_vae(self.path)
        try:
            self.vae = wan_vae.wan_vae_from_config(config, dtype=_dtype(encoders))
        except ValueError as e:
            raise ConfigError(f"encoders.vae={self.path}: {e}") from None
        if latent_channels is not None and self.vae.z_dim != int(latent_channels):
            raise ConfigError(f"encoders.vae={self.path} makes {self.vae.z_dim}-channel latents "
                              f"but model.in_channels={latent_channels}; use the VAE the model "
                              f"was trained with")
        self.params = jax.device_put(params)
        self._encode = jax.jit(wan_vae.encode_video, static_argnums=0)
        self._decode = jax.jit(wan_vae.decode_video, static_argnums=0)

    @property
    def spatial_factor(self) -> int:
        return self.vae.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.vae.temporal_factor

    def video_frames(self, latent_frames: int) -> int:
        """Video frames of `latent_frames` latent frames: 1 + temporal_factor (F - 1)."""
        return 1 + self.temporal_factor * (int(latent_frames) - 1)

    def encode(self, pixels) -> np.ndarray:
        """Pixels (B, 1 + 4k, H, W, 3) in [-1, 1] -> normalised latents (B, 1 + k, H/8, W/8,
        z_dim) float32 (the posterior mean)."""
        try:
            latents = self._encode(self.vae, self.params, jnp.asarray(pixels, jnp.float32))
        except ValueError as e:  # the VAE's one-line shape checks
            raise ConfigError(str(e)) from None
        return np.asarray(latents, np.float32)

    def decode(self, latents) -> np.ndarray:
        """Normalised latents (B, F, h, w, z_dim) -> pixels (B, 1 + 4 (F - 1), 8h, 8w, 3) float32
        in [-1, 1], one video per call (a batch of 81-frame 480p videos at once needs ~94 GiB:
        --mode=compile's vae_decode program)."""
        return np.concatenate([
            np.asarray(self._decode(self.vae, self.params, jnp.asarray(one[None], jnp.float32)),
                       np.float32) for one in np.asarray(latents)])


def tokenizer_path(encoders: Mapping[str, Any], text_path: str) -> str:
    """encoders.tokenizer, else the folder of encoders.text (its own folder when it is a file)
    or the folder above it that holds spiece.model (tokenizer's layouts, see data/tokenizer.py)."""
    from fvdm_jax.data.tokenizer import MODEL_PLACES

    given = encoders.get("tokenizer")
    if given:
        return os.path.expanduser(str(given))
    folder = text_path if os.path.isdir(text_path) else os.path.dirname(os.path.abspath(text_path))
    for candidate in (folder, os.path.dirname(os.path.abspath(folder))):
        if any(os.path.isfile(os.path.join(candidate, place)) for place in MODEL_PLACES):
            return candidate
    raise ConfigError(f"no spiece.model in {folder} or the folder above it (encoders.text="
                      f"{text_path}): set encoders.tokenizer to google/umt5-xxl's spiece.model "
                      f"or its folder")


class WanTextEncoder:
    """UMT5 (encoders.text) + its tokenizer: prompts -> Wan's text contexts."""

    def __init__(self, encoders: Mapping[str, Any], text_dim: int | None = None):
        from fvdm_jax.convert.umt5 import convert_umt5
        from fvdm_jax.data.tokenizer import UMT5Tokenizer
        from fvdm_jax.models.umt5 import umt5_from_config

        self.path = _path(encoders, "text", "point it at a transformers UMT5 encoder folder or "
                                            "Wan's models_t5_umt5-xxl-enc-bf16.pth")
        self.text_length = int(encoders.get("text_length") or 512)
        self.tokenizer = UMT5Tokenizer(tokenizer_path(encoders, self.path),
                                       max_length=self.text_length)
        params, config = convert_umt5(self.path)
        try:
            self.model = umt5_from_config(config, dtype=_dtype(encoders))
        except ValueError as e:
            raise ConfigError(f"encoders.text={self.path}: {e}") from None
        self.dim = int(self.model.d_model)
        if text_dim is not None and self.dim != int(text_dim):
            raise ConfigError(f"encoders.text={self.path} gives {self.dim}-wide contexts but "
                              f"model.wan.text_dim={text_dim}; use the text encoder the model "
                              f"was trained with")
        pieces = self.tokenizer.sp.get_piece_size()
        if pieces > self.model.vocab_size:
            raise ConfigError(f"the tokenizer {self.tokenizer.path} has {pieces} pieces, more than "
                              f"the {self.model.vocab_size} embeddings of encoders.text="
                              f"{self.path}: set encoders.tokenizer to that encoder's spiece.model")
        if self.tokenizer.vocab_size > self.model.vocab_size:
            logging.warning("tokenizer %s has %d ids (pieces + sentinels) for %d embeddings: "
                            "prompts that spell out high <extra_id_N> sentinels are clipped",
                            self.tokenizer.path, self.tokenizer.vocab_size, self.model.vocab_size)
        self.params = jax.device_put(params)
        self._apply = jax.jit(self.model.apply)

    def encode(self, prompts: str | Sequence[str]) -> list[np.ndarray]:
        """Each prompt's hidden states of its real tokens (pieces + EOS, at most text_length):
        a list of float32 (n_i, d_model). One prompt per call of the (1, text_length) program."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = []
        for prompt in prompts:
            ids, mask = self.tokenizer([prompt])
            hidden = np.asarray(self._apply(self.params, ids, mask), np.float32)
            out.append(hidden[0, : int(mask.sum())])
        return out

    def padded(self, prompts: str | Sequence[str], length: int | None = None) -> np.ndarray:
        """(B, length, d_model) float32: `encode` zero-padded to length (default text_length)."""
        length = self.text_length if length is None else int(length)
        contexts = self.encode(prompts)
        out = np.zeros((len(contexts), length, self.dim), np.float32)
        for row, context in enumerate(contexts):
            n = min(len(context), length)
            out[row, :n] = context[:n]
        return out
