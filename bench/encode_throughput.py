"""SD-VAE encode throughput of the latent-cache job (frames/s), on random weights (no download).

    python bench/encode_throughput.py [--image_size=256] [--frames=32] [--per_device_batch=4]
                                      [--dtype=float32] [--frames_per_video=16]
                                      [--block_out_channels=128,256,512,512] [--layers_per_block=2]

Prints one JSON line: device, jax version, settings, compile seconds, encoded frames/s (the full
SD KL-f8 encoder: 128/256/512/512 channels, 2 layers per block) and seconds per video of
--frames_per_video frames: the cost the VAE would add to every training video if latents were
not cached (compare with train_throughput's seconds per video, 1 / videos_per_s).
Needs jax, flax and numpy only (no tensorflow, clu, grain or ml_collections).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from bench import benchlib  # noqa: E402
from fvdm_jax.models.vae import AutoencoderKL  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=32, help="frames timed after compilation")
    parser.add_argument("--per_device_batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--frames_per_video", type=int, default=16)
    parser.add_argument("--block_out_channels", default="128,256,512,512",
                        help="the encoder widths (default: the SD VAE's; smaller for smoke tests)")
    parser.add_argument("--layers_per_block", type=int, default=2)
    args = parser.parse_args(argv)
    load_before = benchlib.load_average()

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    widths = tuple(int(c) for c in args.block_out_channels.split(","))
    vae = AutoencoderKL(
        block_out_channels=widths,
        layers_per_block=args.layers_per_block,
        norm_num_groups=min(32, *widths),
        dtype=dtype,
    )
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("batch",))
    batch = args.per_device_batch * len(devices)
    shape = (batch, args.image_size, args.image_size, 3)
    params = jax.jit(lambda: vae.init(jax.random.key(0), jnp.zeros(shape, jnp.float32)))()
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    encode = jax.jit(lambda p, x: vae.apply(p, x, method=AutoencoderKL.encode))
    frames = jax.device_put(
        np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32), sharding
    )
    started = time.perf_counter()
    jax.block_until_ready(encode(params, frames))
    compile_s = time.perf_counter() - started
    calls = max(1, args.frames // batch)
    started = time.perf_counter()
    for _ in range(calls):
        out = encode(params, frames)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - started
    frames_per_s = calls * batch / elapsed
    benchlib.emit(benchlib.record(
        "encode_throughput",
        image_size=args.image_size,
        block_out_channels=list(widths),
        layers_per_block=args.layers_per_block,
        batch=batch,
        dtype=args.dtype,
        compile_s=round(compile_s, 2),
        frames_per_s=round(frames_per_s, 4),
        frames_per_video=args.frames_per_video,
        seconds_per_video=round(args.frames_per_video / frames_per_s, 3),
    ), load_before)


if __name__ == "__main__":
    main()
