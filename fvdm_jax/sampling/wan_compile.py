"""Wan's own encoders as compile programs (--mode=compile, fvdm_jax/jobs/compile.py): the Wan 2.1
VAE's encode of one video and decode, and UMT5 on one prompt, each lowered on abstract weights for
one chip of a target (no weights read: the architectures come from encoders.vae / encoders.text's
config.json, else the Wan 2.1 VAE and UMT5-XXL) and measured with XLA's memory plan."""

from __future__ import annotations

import json
import os

from fvdm_jax.errors import ConfigError

# ---- Wan's encoders: the Wan 2.1 VAE and UMT5, one chip each, as --mode=encode runs them ------

ONE_CHIP = ("one chip (the first device of the slice): --mode=encode of a Wan config runs the "
            "encoders on each process's first local device, one video and one prompt per call")
DECODE_CHIP = ("one chip (the first device of the slice), sample.batch_size videos at once; "
               "--mode=sample decodes one video per call (sample.batch_size=1 is its figure)")


def _json_file(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            value = json.load(f)
        except ValueError as e:
            raise ConfigError(f"{path} is not JSON ({e})") from None
    return value if isinstance(value, dict) else None


def _encoder_config(config, key: str, subfolder: str, accept) -> tuple[dict | None, str | None]:
    """(config.json dict, its path) of encoders.<key> without reading any weights: the path
    itself when it is a .json file, else the config.json of the folder (a pipeline folder's
    `subfolder`/), or of the weights file's folder, when `accept` takes it; (None, None) when
    encoders.<key> is not set or has no such config.json (the original release files)."""
    given = (config.get("encoders") or {}).get(key)
    if not given:
        return None, None
    path = os.path.expanduser(str(given))
    if not os.path.exists(path):
        raise ConfigError(f"encoders.{key}={path} does not exist")
    if path.endswith(".json"):
        candidates = [path]
    elif os.path.isdir(path):
        candidates = [os.path.join(path, subfolder, "config.json"), os.path.join(path, "config.json")]
    else:
        candidates = [os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")]
    for candidate in candidates:
        found = _json_file(candidate)
        if found is not None and accept(found):
            return found, candidate
    if path.endswith(".json"):
        raise ConfigError(f"encoders.{key}={path} is not a {subfolder} config.json")
    return None, None


def wan_vae_config(config) -> tuple[dict, str]:
    """(diffusers AutoencoderKLWan config, where it came from) of the vae_encode / vae_decode
    programs of a Wan config: encoders.vae's config.json, else the Wan 2.1 VAE's (the config
    convert_wan_vae takes for the original Wan2.1_VAE.pth)."""
    from fvdm_jax.models.wan_vae import WAN21_CONFIG

    def accept(c):  # not the DiT's config.json beside the original Wan2.1_VAE.pth
        return c.get("_class_name") == "AutoencoderKLWan" or ("_class_name" not in c and "z_dim" in c)

    found, path = _encoder_config(config, "vae", "vae", accept)
    return (found, path) if found is not None else (dict(WAN21_CONFIG), "Wan 2.1 VAE (WAN21_CONFIG)")


def umt5_config(config) -> tuple[dict, str]:
    """(transformers UMT5 config, where it came from) of the text_encode program: encoders.text's
    config.json, else UMT5-XXL's (models.umt5.UMT5_XXL, Wan's text encoder)."""
    from fvdm_jax.models.umt5 import UMT5_XXL

    found, path = _encoder_config(config, "text", "text_encoder",
                                  lambda c: "d_model" in c and "d_kv" in c)
    return (found, path) if found is not None else (dict(UMT5_XXL), "UMT5-XXL (models.umt5.UMT5_XXL)")


def build_wan_vae(config):
    from fvdm_jax.models import wan_vae
    from fvdm_jax.sampling.wan_encoders import _dtype

    architecture, source = wan_vae_config(config)
    try:
        vae = wan_vae.wan_vae_from_config(architecture, dtype=_dtype(config.encoders))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"Wan VAE config {source}: {e}") from None
    return vae, source


def _one_chip(devices):
    from jax.sharding import SingleDeviceSharding

    return SingleDeviceSharding(devices[0])


def _wan_vae_record(config, devices, hbm_gib, where, options, decode: bool) -> dict:
    import jax
    import numpy as np

    from fvdm_jax.models import wan_vae
    from fvdm_jax.runtime.compiled import measure

    vae, source = build_wan_vae(config)
    one = _one_chip(devices)
    latent_frames = int(config.model.num_frames)
    h, w = (int(v) for v in config.model.wan.latent_size)
    frames = 1 + vae.temporal_factor * (latent_frames - 1)
    pixels = [frames, h * vae.spatial_factor, w * vae.spatial_factor, vae.in_channels]
    latents = [latent_frames, h, w, vae.z_dim]
    params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                                    wan_vae.param_shapes(vae))  # float32, as convert_wan_vae gives
    name = "vae_decode" if decode else "vae_encode"
    videos = int(config.sample.batch_size) if decode else 1
    if decode:
        x = jax.ShapeDtypeStruct((videos, *latents), np.float32, sharding=one)
        program = jax.jit(wan_vae.decode_video, static_argnums=0)
    else:
        x = jax.ShapeDtypeStruct((videos, *pixels), np.float32, sharding=one)
        program = jax.jit(wan_vae.encode_video, static_argnums=0)
    record, _ = measure(program.lower(vae, params, x), name, where, hbm_gib, options)
    return dict(record, program=name, mesh={"one chip": 1},
                placement=DECODE_CHIP if decode else ONE_CHIP, vae_config=source, batch_size=videos,
                video_shape=[videos, *pixels], latent_shape=[videos, *latents],
                dtype=str(config.encoders.get("dtype") or "float32"), param_dtype="float32")


def wan_vae_encode_record(config, devices, hbm_gib: float, where: str, options=None) -> dict:
    """The Wan VAE's encode_video of one video of 1 + 4 (model.num_frames - 1) frames at
    model.wan.latent_size x 8 pixels on one chip (matmuls in encoders.dtype, float32 weights)."""
    return _wan_vae_record(config, devices, hbm_gib, where, options, decode=False)


def vae_decode_record(config, devices, hbm_gib: float, where: str, options=None) -> dict:
    """A Wan config: the Wan VAE's decode_video of sample.batch_size videos' latents
    (model.num_frames x model.wan.latent_size) back to pixels, all on one chip, as --mode=sample
    decodes a batch."""
    return _wan_vae_record(config, devices, hbm_gib, where, options, decode=True)


def build_umt5(config):
    from fvdm_jax.models.umt5 import umt5_from_config
    from fvdm_jax.sampling.wan_encoders import _dtype

    architecture, source = umt5_config(config)
    try:
        model = umt5_from_config(architecture, dtype=_dtype(config.encoders))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"UMT5 config {source}: {e}") from None
    return model, architecture, source


def _umt5_param_dtype(architecture: dict) -> str:
    """The dtype the text encoder's weights are stored (and kept) in: config.json's torch_dtype /
    dtype when it names one, else bfloat16 (Wan's models_t5_umt5-xxl-enc-bf16.pth)."""
    from fvdm_jax.models.umt5 import DTYPES

    stored = architecture.get("torch_dtype") or architecture.get("dtype")
    return str(stored) if stored in DTYPES else "bfloat16"


def text_encode_record(config, devices, hbm_gib: float, where: str, options=None) -> dict:
    """A Wan config: UMT5 (encoders.text's config, else UMT5-XXL) on one prompt of
    encoders.text_length tokens, on one chip, matmuls in encoders.dtype, weights in their stored
    dtype (`_umt5_param_dtype`), as WanTextEncoder runs it."""
    import jax
    import numpy as np

    from fvdm_jax.models.umt5 import DTYPES
    from fvdm_jax.runtime.compiled import measure

    model, architecture, source = build_umt5(config)
    one = _one_chip(devices)
    length = int(config.encoders.get("text_length") or 512)
    ids = jax.ShapeDtypeStruct((1, length), np.int32, sharding=one)
    mask = jax.ShapeDtypeStruct((1, length), np.int32, sharding=one)
    param_dtype = _umt5_param_dtype(architecture)
    params = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, DTYPES[param_dtype], sharding=one),
        jax.eval_shape(model.init, jax.random.key(0), ids, mask))
    lowered = jax.jit(model.apply).lower(params, ids, mask)
    record, _ = measure(lowered, "text_encode", where, hbm_gib, options)
    return dict(record, program="text_encode", mesh={"one chip": 1}, placement=ONE_CHIP,
                text_config=source, tokens=[1, length], d_model=int(model.d_model),
                num_layers=int(model.num_layers),
                dtype=str(config.encoders.get("dtype") or "float32"),
                param_dtype=param_dtype)
