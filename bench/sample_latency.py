"""Sampling latency: DDIM-N of the video DiT per batch and per video, compile time, model FLOP/s.

    python bench/sample_latency.py --config=configs/ffs_xl.py [--size=XL] [--batch_size=1]
        [--num_steps=50] [--sampler=ddim] [--dtype=bfloat16] [--param_dtype=float32]
        [--attention=xla|cudnn|auto] [--unroll] [--cfg_scale=1.0] [--repeats=3]
        [--peak_flops=989e12] [--measure_matmul | --matmul_peak=FLOPS] [--set model.KEY=VALUE]

Builds the DiT from the config (fvdm_jax.models.dit.model_from_config) with random weights and
times the whole sampling loop of fvdm_jax.diffusion.samplers.make_sampler (one jitted lax.scan;
the weights are arguments of the compiled program) over the unconditional generation schedule
of fvdm_jax.diffusion.tasks.generate. Prints one JSON line: compile time, seconds per batch and
per video (median of --repeats), DiT FLOPs per video (num_steps x the analytic forward count of
fvdm_jax/training/flops.py, x2 with classifier-free guidance, which doubles the batch the model sees),
achieved FLOP/s, MFU against the vendor bf16 peak (or --peak_flops) and the ratio to the
machine's own matmul rate (--measure_matmul: the mean of the rates measured just before and
just after the timed calls, in the compute dtype). With --cfg_scale != 1 the model must be
class-conditional (configs/ucf_xl.py, or --set model.num_classes=101).

The GPU target (one 16x256x256 FFS XL/2 video, DDIM-50, <= 0.5 s):
    python bench/sample_latency.py --config=configs/ffs_xl.py --batch_size=1 --num_steps=50 \\
        --dtype=bfloat16 --attention=cudnn
Needs jax, flax, einops, numpy and ml_collections (the configs import it; carry a wheel to
machines without it); no tensorflow, clu or grain.
"""

import argparse
import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import benchlib  # noqa: E402
from fvdm_jax.config.load import load_config  # noqa: E402
from fvdm_jax.diffusion import tasks  # noqa: E402
from fvdm_jax.diffusion.samplers import SAMPLERS, cfg_model_fn, make_sampler  # noqa: E402
from fvdm_jax.diffusion.schedule import Schedule  # noqa: E402
from fvdm_jax.models.dit import model_from_config  # noqa: E402
from fvdm_jax.training.flops import dit_forward_flops, model_kwargs_from_config  # noqa: E402


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ffs_xl.py")
    parser.add_argument("--size", default=None, help="S / B / L / XL (default: the config's)")
    parser.add_argument("--batch_size", type=int, default=1, help="videos per sampler call")
    parser.add_argument("--num_steps", type=int, default=50, help="respaced sampling steps")
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--param_dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--attention", default=None, choices=["xla", "cudnn", "auto"])
    parser.add_argument("--unroll", action="store_true", help="model.scan_layers=False")
    parser.add_argument("--cfg_scale", type=float, default=1.0,
                        help="classifier-free guidance (!= 1 doubles the model batch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampler calls")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--peak_flops", type=float, default=None)
    parser.add_argument("--matmul_peak", type=float, default=None)
    parser.add_argument("--measure_matmul", action="store_true")
    parser.add_argument("--matmul_sizes", default=None)
    return parser.parse_args(argv)


def configure(args):
    config = load_config(args.config)
    model = config.model
    if args.size:
        model.size = args.size
    for key in ("dtype", "param_dtype", "attention"):
        if getattr(args, key):
            model[key] = getattr(args, key)
    if args.unroll:
        model.scan_layers = False
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        config[section][name] = value
    return config


def main(argv=None):
    args = parse(argv)
    load_before = benchlib.load_average()
    config = configure(args)
    model = model_from_config(config.model)
    schedule = Schedule.from_config(config.diffusion)
    b, f, s, c = args.batch_size, model.num_frames, model.input_size, model.in_channels
    guided = args.cfg_scale != 1.0
    if guided and model.num_classes == 0:
        raise SystemExit(
            "--cfg_scale needs a class-conditional model: use configs/ucf_xl.py or "
            "--set model.num_classes=101"
        )

    def random_inputs():
        # adaLN-Zero and the final layer start at zero (a constant output): small random weights
        # everywhere give a realistic, if meaningless, computation. One program (every eager op
        # is a compilation of its own, ~1 s each on a small CPU), nothing built on the host.
        init_key, key, noise_key = jax.random.split(jax.random.key(0), 3)
        x = jnp.zeros((1, f, s, s, c), jnp.float32)
        t = jnp.zeros((1, f), jnp.float32)
        y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
        params = nn.unbox(model.init(init_key, x, t, y))
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(key, len(leaves))
        params = jax.tree_util.tree_unflatten(treedef, [
            (0.02 * jax.random.normal(k, p.shape, jnp.float32)).astype(p.dtype)
            for k, p in zip(keys, leaves)
        ])
        return params, jax.random.normal(noise_key, (b, f, s, s, c), jnp.float32)

    params, noise = jax.jit(random_inputs)()
    labels = np.arange(b, dtype=np.int32) % max(model.num_classes, 1)

    if guided:
        def model_fn(p, x, tau):
            apply = lambda x, t, y: model.apply(p, x, t, y)  # noqa: E731
            return cfg_model_fn(apply, labels, model.num_classes, args.cfg_scale, c)(x, tau)
    elif model.num_classes:
        def model_fn(p, x, tau):
            return model.apply(p, x, tau, labels)
    else:
        def model_fn(p, x, tau):
            return model.apply(p, x, tau)

    sampler = make_sampler(model_fn, schedule, sampler=args.sampler)
    taus, tau_next, _ = tasks.generate(
        args.num_steps, b, f, num_timesteps=schedule.num_timesteps
    )
    taus, tau_next = jax.device_put((np.asarray(taus), np.asarray(tau_next)))
    stochastic = args.sampler != "ddim"
    call_kw = dict(params=params, rng=jax.random.key(3) if stochastic else None)

    started = time.perf_counter()
    lowered = sampler.lower(noise, taus, tau_next, **call_kw)
    lower_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - started

    holder = {}

    def run():
        holder["out"] = compiled(noise, taus, tau_next, **call_kw)
        return holder["out"]

    warmup_s = benchlib.timed(run, 1)[0]
    matmul, matmul_info = args.matmul_peak, None
    if args.measure_matmul:
        # Before and after the timed calls (a shared machine's load changes): the mean counts.
        matmul_info = benchlib.matmul_peak(
            config.model.dtype, benchlib.parse_sizes(args.matmul_sizes)
        )
    times = benchlib.timed(run, args.repeats) if args.repeats > 0 else [warmup_s]
    if matmul_info:
        after = benchlib.matmul_rate(matmul_info["best_size"], config.model.dtype)["flops_per_s"]
        matmul_info["rates_around_calls"] = [matmul_info["flops_per_s"], after]
        matmul = (matmul_info["flops_per_s"] + after) / 2
    batch_s = benchlib.median(times)

    kwargs = model_kwargs_from_config(config.model)
    forward = dit_forward_flops(**kwargs)["total"]
    evaluations = args.num_steps * (2 if args.sampler == "ode_heun" else 1)
    flops_per_video = evaluations * forward * (2 if guided else 1)
    achieved = flops_per_video * b / batch_s
    peak = args.peak_flops or benchlib.vendor_peak()
    line = benchlib.record(
        "sample_latency",
        config=args.config,
        model={k: config.model[k] for k in (
            "size", "patch_size", "num_frames", "input_size", "in_channels", "num_classes",
            "dtype", "param_dtype", "attention", "scan_layers")},
        sampler=args.sampler,
        num_steps=args.num_steps,
        batch=b,
        cfg_scale=args.cfg_scale,
        lower_s=round(lower_s, 3),
        compile_s=round(compile_s, 3),
        memory_plan=benchlib.memory_analysis(compiled),
        warmup_s=round(warmup_s, 5),
        repeats=len(times),
        seconds_per_batch=round(batch_s, 5),
        seconds_per_batch_min=round(min(times), 5),
        seconds_per_video=round(batch_s / b, 5),
        forward_flops_per_video=forward,
        dit_flops_per_video=flops_per_video,
        model_flops_per_s=achieved,
        mfu=round(achieved / peak, 4) if peak else None,
        peak_flops_per_device=peak,
        matmul_flops_per_s=matmul,
        matmul=matmul_info,
        model_flops_over_matmul=round(achieved / matmul, 4) if matmul else None,
        peak_memory_bytes=benchlib.peak_memory_bytes(),
        finite=bool(np.isfinite(np.asarray(jax.device_get(holder["out"]))).all()),
    )
    benchlib.emit(line, load_before)


if __name__ == "__main__":
    main()
