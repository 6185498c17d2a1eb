"""SD-VAE encode throughput of the latent-cache job (frames/s), on random weights (no download).

    python bench/encode_throughput.py [--image_size=256] [--frames=32] [--per_device_batch=4]
                                      [--dtype=float32]

Prints one JSON line: device, jax version, settings, compile seconds and encoded frames/s (the
full SD KL-f8 encoder: 128/256/512/512 channels, 2 layers per block).
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fvdm_jax.models.vae import AutoencoderKL


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=32, help="frames timed after compilation")
    parser.add_argument("--per_device_batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    vae = AutoencoderKL(dtype=dtype)
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("batch",))
    batch = args.per_device_batch * len(devices)
    x = jnp.zeros((batch, args.image_size, args.image_size, 3), jnp.float32)
    params = jax.jit(vae.init)(jax.random.key(0), x)
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    encode = jax.jit(lambda p, x: vae.apply(p, x, method=AutoencoderKL.encode))
    frames = jax.device_put(
        jax.random.uniform(jax.random.key(1), x.shape, minval=-1, maxval=1), sharding
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
    print(json.dumps({
        "bench": "encode_throughput",
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "jax": jax.__version__,
        "image_size": args.image_size,
        "batch": batch,
        "dtype": args.dtype,
        "compile_s": round(compile_s, 2),
        "frames_per_s": round(calls * batch / elapsed, 3),
        "command": " ".join([sys.executable, *sys.argv]),
    }))


if __name__ == "__main__":
    main()
