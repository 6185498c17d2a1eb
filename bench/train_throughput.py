"""Train-step throughput: step time, compile time, videos/s, model FLOP/s, MFU and memory.

    python bench/train_throughput.py --config=configs/ffs_xl.py [--size=XL] [--batch_size=4]
        [--steps=5] [--dtype=bfloat16] [--param_dtype=float32] [--remat=none|dots|full]
        [--attention=xla|cudnn|auto] [--unroll] [--no_donate] [--grad_accum=1] [--mesh=-1,1,1]
        [--compile_only] [--peak_flops=989e12] [--measure_matmul | --matmul_peak=FLOPS]
        [--set model.patch_size=4 ...]

Runs the real jitted, sharded train step of fvdm_jax.training.step (PTSS, hybrid loss, AdamW, EMA,
state donation) on random latents, as with a warm latent cache (no data loading, no VAE), and
prints one JSON line: the device, jax version, config, compile time (trace + lower, then XLA
compile), the median step time, videos/s, the exact analytic model FLOPs of fvdm_jax/training/flops.py
(3 x forward per video; XL/2 = 3.73 TFLOP forward, 11.2 TFLOP per training video, adaLN once per
frame), achieved model FLOP/s, MFU against the vendor bf16 peak (GPU/TPU) or --peak_flops, XLA's
static memory plan (all backends) and the runtime peak (GPU/TPU), and the ratio of model FLOP/s
to the machine's own matmul rate: the yardstick on CPU. --measure_matmul measures that rate in
the same process in the compute dtype (bench/matmul_peak.py's best size, then that size again
before and after every timed step, so that a shared machine's changing load hits both alike) and
reports the median over steps of (step's model FLOP/s) / (mean of the two adjacent matmul rates).

--compile_only lowers and compiles the step on abstract state (nothing allocated): compile time
and memory plan of models that do not fit, e.g. XL on 8 simulated CPU devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python bench/train_throughput.py --config=configs/ffs_xl.py --batch_size=8 --compile_only

The matmul ratio divides by the measured single-device rate times the device count, except on
CPU, where simulated devices share the same cores (the rate of one device is the machine's).
Needs jax, flax, optax, orbax-checkpoint, einops and ml_collections (the configs import it; carry
a wheel to machines without it); no tensorflow, clu or grain.
"""

import argparse
import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import benchlib  # noqa: E402
from fvdm_jax.config.load import load_config  # noqa: E402
from fvdm_jax.training.flops import dit_forward_flops, model_kwargs_from_config  # noqa: E402
from fvdm_jax.training.loop import create_state  # noqa: E402
from fvdm_jax.training.setup import build_setup  # noqa: E402
from fvdm_jax.training.step import JittedTrainStep  # noqa: E402


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ffs_xl.py")
    parser.add_argument("--size", default=None, help="S / B / L / XL (default: the config's)")
    parser.add_argument("--batch_size", type=int, default=None, help="global batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up step")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="model.dtype: the compute dtype")
    parser.add_argument("--param_dtype", default=None, choices=["float32", "bfloat16"],
                        help="model.param_dtype: the master weights (keep float32)")
    parser.add_argument("--remat", default=None, choices=["auto", "none", "dots", "dots_no_batch", "full"])
    parser.add_argument("--attention", default=None, choices=["xla", "cudnn", "auto"])
    parser.add_argument("--unroll", action="store_true", help="model.scan_layers=False")
    parser.add_argument("--no_donate", action="store_true", help="train.donate_state=False")
    parser.add_argument("--grad_accum", type=int, default=None, help="train.grad_accum_steps")
    parser.add_argument("--mesh", default=None, help="mesh.shape, e.g. -1,1,1 or 1,8,1")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other config override, e.g. model.patch_size=4 (repeatable)")
    parser.add_argument("--compile_only", action="store_true",
                        help="lower + compile on abstract state; no step is run")
    parser.add_argument("--topology", default=None,
                        help="with --compile_only: compile for this TPU slice instead of the local "
                             "devices (v5e-16, v5p-128, v5e:4x4, ...; needs libtpu)")
    parser.add_argument("--num_slices", type=int, default=1, help="slices of --topology (DCN)")
    parser.add_argument("--peak_flops", type=float, default=None,
                        help="per-device peak FLOP/s for MFU (default: vendor bf16 peak by kind)")
    parser.add_argument("--matmul_peak", type=float, default=None,
                        help="a measured per-device matmul FLOP/s (bench/matmul_peak.py)")
    parser.add_argument("--measure_matmul", action="store_true",
                        help="measure the matmul rate in this run, in the compute dtype")
    parser.add_argument("--matmul_sizes", default=None, help="sizes for --measure_matmul")
    return parser.parse_args(argv)


def _value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def configure(args):
    config = load_config(args.config)
    model = config.model
    if args.size:
        model.size = args.size
    for key in ("dtype", "param_dtype", "remat", "attention"):
        if getattr(args, key):
            model[key] = getattr(args, key)
    if args.unroll:
        model.scan_layers = False
    if args.no_donate:
        config.train.donate_state = False
    if args.grad_accum:
        config.train.grad_accum_steps = args.grad_accum
    if args.batch_size:
        config.train.batch_size = args.batch_size
    if args.mesh:
        config.mesh.shape = tuple(int(s) for s in args.mesh.split(","))
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        config[section][name] = _value(value)
    return config


def abstract_batch(setup, shape, batch_size):
    return {
        "video": jax.ShapeDtypeStruct(shape, np.float32, sharding=setup.batch_shardings["video"]),
        "label": jax.ShapeDtypeStruct(
            (batch_size,), np.int32, sharding=setup.batch_shardings["label"]
        ),
    }


def main(argv=None):
    args = parse(argv)
    load_before = benchlib.load_average()
    config = configure(args)
    devices = None
    if args.topology:  # a TPU slice's compile-only devices, 'auto' choices resolved for the TPU
        if not args.compile_only:
            raise SystemExit("--topology needs --compile_only (the slice's devices only compile)")
        from fvdm_jax.jobs.compile import for_target, parse_topology, target_devices

        config = for_target(config)
        devices = target_devices(parse_topology(args.topology, args.num_slices))
    setup = build_setup(config, devices)
    model = setup.model
    step = JittedTrainStep(
        model, setup.schedule, setup.optimizer, config.train, config.ptss,
        setup.state_shardings, setup.batch_shardings, mesh=setup.mesh, rules=setup.rules,
    )
    b = int(config.train.batch_size)
    shape = (b, model.num_frames, model.input_size, model.input_size, model.in_channels)

    started = time.perf_counter()
    lowered = step.lower(setup.abstract_state, abstract_batch(setup, shape, b))
    lower_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - started

    kwargs = model_kwargs_from_config(config.model)
    forward = dit_forward_flops(**kwargs)["total"]
    official = dit_forward_flops(**kwargs, per_token_temporal_adaln=True)["total"]
    flops_per_video = 3 * forward
    devices = setup.mesh.size
    line = benchlib.record(
        "train_throughput",
        config=args.config,
        model={k: config.model[k] for k in (
            "size", "patch_size", "num_frames", "input_size", "in_channels", "num_classes",
            "dtype", "param_dtype", "remat", "attention", "scan_layers")},
        donate_state=bool(config.train.donate_state),
        grad_accum_steps=int(config.train.grad_accum_steps),
        batch=b,
        mesh=dict(setup.mesh.shape),
        devices=devices,
        device_kind=setup.mesh.devices.flat[0].device_kind,
        topology=args.topology,
        compile_only=args.compile_only,
        lower_s=round(lower_s, 3),
        compile_s=round(compile_s, 3),
        forward_flops_per_video=forward,
        train_flops_per_video=flops_per_video,
        official_per_token_adaln_forward_flops=official,
        memory_plan=benchlib.memory_analysis(compiled),
    )
    if args.compile_only:
        benchlib.emit(line, load_before)
        return

    state = create_state(setup, int(config.train.seed))
    rng = np.random.default_rng(0)
    batch = {
        "video": jax.device_put(
            rng.standard_normal(shape, dtype=np.float32), setup.batch_shardings["video"]
        ),
        "label": jax.device_put(np.zeros((b,), np.int32), setup.batch_shardings["label"]),
    }
    holder = {"state": state}

    def run():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        return holder["metrics"]

    warmup_s = benchlib.timed(run, 1)[0]  # first run: allocation, autotuning, caches
    matmul, matmul_info, ratios = args.matmul_peak, None, None
    matmul_devices = 1 if jax.default_backend() == "cpu" else devices
    if args.measure_matmul and args.steps > 0:
        # The yardstick is measured between the timed steps (the best size once, then that size
        # before and after every step), so that a shared machine's changing load hits both alike:
        # each step's ratio uses the mean of the matmul rates just before and just after it.
        matmul_info = benchlib.matmul_peak(
            config.model.dtype, benchlib.parse_sizes(args.matmul_sizes)
        )
        rates, times = [matmul_info["flops_per_s"]], []
        for _ in range(args.steps):
            times += benchlib.timed(run, 1)
            rates.append(benchlib.matmul_rate(matmul_info["best_size"], config.model.dtype)[
                "flops_per_s"])
        ratios = [
            flops_per_video * b / t / (matmul_devices * (r0 + r1) / 2)
            for t, r0, r1 in zip(times, rates[:-1], rates[1:])
        ]
        matmul_info["rates_around_steps"] = rates
        matmul = benchlib.median(rates)
    else:
        times = benchlib.timed(run, args.steps) if args.steps > 0 else [warmup_s]
    step_s = benchlib.median(times)
    achieved = flops_per_video * b / step_s
    peak = args.peak_flops or benchlib.vendor_peak()
    if ratios is None and matmul:
        ratios = [achieved / (matmul * matmul_devices)]
    last = jax.device_get(holder["metrics"])
    line.update(
        warmup_step_s=round(warmup_s, 5),
        steps=len(times),
        step_s=round(step_s, 5),
        step_s_min=round(min(times), 5),
        videos_per_s=round(b / step_s, 5),
        model_flops_per_s=achieved,
        mfu=round(achieved / (devices * peak), 4) if peak else None,
        peak_flops_per_device=peak,
        matmul_flops_per_s=matmul,
        matmul=matmul_info,
        model_flops_over_matmul=round(benchlib.median(ratios), 4) if ratios else None,
        peak_memory_bytes=benchlib.peak_memory_bytes(),
        loss=float(last["loss"]),
    )
    benchlib.emit(line, load_before)


if __name__ == "__main__":
    main()
