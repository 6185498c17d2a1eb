"""Convert an official FVDM or Latte checkpoint, or Wan 2.1 T2V weights, into an fvdm_jax
inference checkpoint.

    python -m fvdm_jax.convert official --checkpoint CKPT --output DIR [--config configs/x.py]
    python -m fvdm_jax.convert wan --checkpoint DIR_OR_FILE --output DIR [--dtype bfloat16]

CKPT: a torch file (.pt/.pth/.bin/.ckpt, read with torch.load(weights_only=True); torch is an
optional extra), a .safetensors file, or a .npz of the state_dict tensors (no torch needed; use
--prefix to pick one state_dict out of an npz that holds several). Containers {'ema': sd} and
{'model': sd} are unwrapped, the EMA weights first; `_orig_mod.` (torch.compile) and `module.`
(DDP) key prefixes are stripped. A tensor with no place in the model, or a parameter the file
lacks, stops the conversion with one line listing them. Without --config the model shape is inferred
from the weights (the head count from the named S/B/L/XL sizes, or --num_heads) and the diffusion
section takes the default 1000-step linear schedule.

wan: a diffusers WanTransformer3DModel folder (config.json + diffusion_pytorch_model.safetensors or
shards + index.json), or original Wan / DiffSynth weights (a file or folder); see
fvdm_jax/convert/wan.py and docs/wan.md. The diffusion section is Wan's flow matching
(WAN_DIFFUSION); tensors keep their stored dtype unless --dtype is given.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from fvdm_jax.checkpoint.inference import save_inference_checkpoint
from fvdm_jax.convert.official import (
    convert_state_dict,
    infer_model_config,
    read_checkpoint,
)
from fvdm_jax.convert.tensors import ConversionError
from fvdm_jax.convert.wan import convert_wan as convert_wan_weights
from fvdm_jax.diffusion.schedule import Schedule
from fvdm_jax.models.dit import model_from_config

FORMATS = ("official", "wan")
# Wan 2.1's training process: rectified flow on t in [0, 1000], sampled with shift 5.
WAN_DIFFUSION = {"process": "flow", "num_train_timesteps": 1000, "shift": 5.0}

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Official FVDM / Latte checkpoint file, or Wan weights (file or folder)."
)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the inference checkpoint.")
_PREFIX = flags.DEFINE_string("prefix", "", "Key prefix selecting one state_dict inside an .npz.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Head count when it cannot be inferred.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "wan: cast the weights (default: keep the stored dtype).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with model/diffusion.")


def convert_official(checkpoint, output, config=None, prefix="", num_heads=None) -> str:
    """Converts CKPT to an inference checkpoint at `output`; returns the directory."""
    sd = read_checkpoint(checkpoint, prefix)
    if config is not None:
        model_config = config.model.to_dict()
        diffusion_config = config.diffusion.to_dict()
    else:
        model_config = infer_model_config(sd, num_heads)
        diffusion_config = Schedule().to_config()
    model = model_from_config(model_config)
    Schedule.from_config(diffusion_config)
    params = convert_state_dict(sd, model)
    return save_inference_checkpoint(output, params, model_config, diffusion_config)


def convert_wan(checkpoint, output, num_heads=None, dtype=None) -> str:
    """Converts Wan T2V weights at `checkpoint` to an inference checkpoint; returns the directory."""
    params, model_config = convert_wan_weights(checkpoint, num_heads, dtype)
    return save_inference_checkpoint(output, params, model_config, WAN_DIFFUSION)


def main(argv):
    if len(argv) != 2 or argv[1] not in FORMATS:
        formats = "|".join(FORMATS)
        raise app.UsageError(f"usage: python -m fvdm_jax.convert {{{formats}}} --checkpoint CKPT --output DIR")
    if not _CHECKPOINT.value or not _OUTPUT.value:
        raise app.UsageError("--checkpoint and --output are required")
    try:
        if argv[1] == "wan":
            out = convert_wan(_CHECKPOINT.value, _OUTPUT.value, _NUM_HEADS.value, _DTYPE.value)
        else:
            out = convert_official(
                _CHECKPOINT.value, _OUTPUT.value, _CONFIG.value, _PREFIX.value, _NUM_HEADS.value
            )
    except (ConversionError, FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote inference checkpoint {out}")


if __name__ == "__main__":
    app.run(main)
