"""Train-step throughput: step time, compile time, videos/s, model FLOP/s, MFU and peak memory.

    python bench/train_throughput.py --config=configs/ffs_xl.py [--size=XL] [--batch_size=4]
        [--steps=10] [--dtype=bfloat16] [--remat=none] [--attention=auto] [--unroll]
        [--mesh=-1,1,1] [--peak_flops=989e12]

Runs the real jitted, sharded train step on random latents (no data loading, as with a warm
latent cache) and prints one JSON line. FLOPs are the exact analytic count of fvdm_jax/flops.py
(3x forward per video), so MFU = videos/s * FLOPs per video / (devices * peak). Needs no
tensorflow or clu.
"""

import argparse
import json
import sys
import time

import jax
import numpy as np

from fvdm_jax.config_utils import load_config
from fvdm_jax.flops import model_flops_from_config
from fvdm_jax.train import PEAK_FLOPS_BY_DEVICE_KIND, build_setup, create_state
from fvdm_jax.train_step import JittedTrainStep


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ffs_xl.py")
    parser.add_argument("--size", default=None, help="S / B / L / XL (default: the config's)")
    parser.add_argument("--batch_size", type=int, default=None, help="global batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after compilation")
    parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    parser.add_argument("--remat", default=None)
    parser.add_argument("--attention", default=None)
    parser.add_argument("--unroll", action="store_true", help="model.scan_layers=False")
    parser.add_argument("--mesh", default=None, help="e.g. -1,1,1")
    parser.add_argument("--peak_flops", type=float, default=None, help="per device, for MFU")
    return parser.parse_args(argv)


def configure(args):
    config = load_config(args.config)
    model = config.model
    if args.size:
        model.size = args.size
    for key in ("dtype", "remat", "attention"):
        if getattr(args, key):
            model[key] = getattr(args, key)
    if args.unroll:
        model.scan_layers = False
    if args.batch_size:
        config.train.batch_size = args.batch_size
    if args.mesh:
        config.mesh.shape = tuple(int(s) for s in args.mesh.split(","))
    return config


def peak_memory_bytes():
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
    return max(peaks) if peaks else None


def main(argv=None):
    args = parse(argv)
    config = configure(args)
    setup = build_setup(config)
    model = setup.model
    state = create_state(setup, int(config.train.seed))
    step = JittedTrainStep(
        model, setup.schedule, setup.optimizer, config.train, config.ptss,
        setup.state_shardings, setup.batch_shardings,
    )
    b = int(config.train.batch_size)
    shape = (b, model.num_frames, model.input_size, model.input_size, model.in_channels)
    rng = np.random.default_rng(0)
    batch = {
        "video": jax.device_put(rng.standard_normal(shape, dtype=np.float32), setup.batch_shardings["video"]),
        "label": jax.device_put(np.zeros((b,), np.int32), setup.batch_shardings["label"]),
    }
    started = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - started
    state, metrics = step(state, batch)  # warm-up (also the jit cache)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    step_s = float(np.median(times))
    flops_per_video = 3 * model_flops_from_config(config.model)
    devices = setup.mesh.size
    kind = jax.devices()[0].device_kind
    peak = args.peak_flops or next(
        (v for k, v in PEAK_FLOPS_BY_DEVICE_KIND.items() if kind.startswith(k)), None
    )
    achieved = flops_per_video * b / step_s
    del compiled
    print(json.dumps({
        "bench": "train_throughput",
        "device": f"{devices} x {kind}",
        "jax": jax.__version__,
        "model": {k: config.model[k] for k in ("size", "patch_size", "dtype", "remat", "attention", "scan_layers")},
        "batch": b,
        "mesh": dict(setup.mesh.shape),
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 5),
        "videos_per_s": round(b / step_s, 4),
        "train_flops_per_video": flops_per_video,
        "model_flops_per_s": achieved,
        "mfu": round(achieved / (devices * peak), 4) if peak else None,
        "peak_memory_bytes": peak_memory_bytes(),
        "loss": float(metrics["loss"]),
        "command": " ".join([sys.executable, *sys.argv]),
    }))


if __name__ == "__main__":
    main()
