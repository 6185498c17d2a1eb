"""Writes the golden vectors of diffusers' AutoencoderKL that tests/test_vae.py checks against.

    python3 -m venv /tmp/venvs/diffusers
    /tmp/venvs/diffusers/bin/pip install torch==2.13.0 diffusers==0.42.1 safetensors numpy
    /tmp/venvs/diffusers/bin/python tools/make_vae_vectors.py [--out tests/data]

torch and diffusers are needed here only. For each config ('small' and the real SD KL-f8 'sd' at
a 32x32 input) the script builds diffusers' model, fills every tensor with `random_state_dict`
(numpy, from a seed, in sorted-name order: the test regenerates the same weights without torch),
and runs it in float32 on CPU. Each vae_<name>.npz holds only the inputs and outputs (torch
layout, channels-first), not the weights:

  config_json    the diffusers config (what config.json would hold)
  tensors_json   JSON [[name, shape], ...] of model.state_dict(), sorted by name
  seed           the weight seed (inputs use seed + 1)
  x              (N, 3, H, W) pixels in [-1, 1]
  mean, logvar   (N, 4, H/f, W/f) encode(x).latent_dist.mean / .logvar
  z              (N, 4, H/f, W/f) unscaled latents fed to decode
  decoded        (N, 3, H, W) decode(z).sample
  versions       "torch X diffusers Y"
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

CONFIGS = {
    "small": dict(
        config=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[32, 64],
            layers_per_block=1,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
            scaling_factor=0.18215,
        ),
        batch=2,
        size=16,
        seed=0,
    ),
    # stabilityai/sd-vae-ft-ema and sd-vae-ft-mse, at a small spatial size.
    "sd": dict(
        config=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=32,
            sample_size=256,
            scaling_factor=0.18215,
        ),
        batch=1,
        size=32,
        seed=1,
    ),
}


def random_state_dict(
    tensors: list[tuple[str, tuple[int, ...]]], seed: int
) -> dict[str, np.ndarray]:
    """Reproducible float32 weights for (name, torch shape) pairs, drawn in sorted-name order.

    Zero-mean uniform noise (cheaper to draw than normal; the real config has 84M numbers) with
    standard deviation 1/sqrt(fan_in) for conv/Linear weights and 0.1 for biases keeps
    activations O(1); 1-D weights are GroupNorm scales 1 + U with std 0.2. Nothing is zero, so
    every tensor matters.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted((n, tuple(s)) for n, s in tensors):
        if name.endswith(".bias"):
            std, offset = 0.1, 0.0
        elif len(shape) == 1:
            std, offset = 0.2, 1.0
        else:
            std, offset = 1.0 / math.sqrt(math.prod(shape[1:])), 0.0
        value = rng.random(shape, dtype=np.float32)  # U[0, 1): mean 1/2, std 1/sqrt(12)
        value -= np.float32(0.5)
        value *= np.float32(std * math.sqrt(12.0))
        value += np.float32(offset)
        out[name] = value
    return out


def make_vectors(name: str) -> dict[str, np.ndarray]:
    import diffusers
    import torch

    spec = CONFIGS[name]
    torch.manual_seed(0)  # diffusers' own init is overwritten below; this only fixes the build
    model = diffusers.AutoencoderKL(**spec["config"]).eval()
    tensors = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    weights = random_state_dict(tensors, spec["seed"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)

    rng = np.random.default_rng(spec["seed"] + 1)
    n, size = spec["batch"], spec["size"]
    latent = size // 2 ** (len(spec["config"]["block_out_channels"]) - 1)
    x = rng.uniform(-1, 1, (n, 3, size, size)).astype(np.float32)
    z = rng.standard_normal((n, spec["config"]["latent_channels"], latent, latent)).astype(
        np.float32
    )
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x)).latent_dist
        decoded = model.decode(torch.from_numpy(z)).sample
    return {
        "config_json": np.array(json.dumps(spec["config"])),
        "tensors_json": np.array(json.dumps([[k, list(s)] for k, s in tensors])),
        "seed": np.array(spec["seed"]),
        "x": x,
        "mean": posterior.mean.numpy(),
        "logvar": posterior.logvar.numpy(),
        "z": z,
        "decoded": decoded.numpy(),
        "versions": np.array(f"torch {torch.__version__} diffusers {diffusers.__version__}"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data")
    )
    parser.add_argument("--configs", nargs="+", default=sorted(CONFIGS), choices=sorted(CONFIGS))
    args = parser.parse_args()
    for name in args.configs:
        vectors = make_vectors(name)
        path = os.path.join(args.out, f"vae_{name}.npz")
        np.savez_compressed(path, **vectors)
        ranges = {k: float(np.abs(v).max()) for k, v in vectors.items() if v.dtype == np.float32}
        print(f"wrote {path} ({os.path.getsize(path)} bytes), max |.|: {ranges}")


if __name__ == "__main__":
    main()
