"""Before/after of train-step optimizations in ONE process: variants timed in alternation.

    python bench/train_ab.py --config=configs/ffs_xl.py --size=S --batch_size=1 --rounds=3 \\
        --variant=--remat=dots --variant=--remat=full --variant=--unroll \\
        --variant=--no_donate --variant=--dtype=bfloat16 [--measure_matmul]

The base takes every flag of bench/train_throughput.py; each --variant adds flags to the base
(quote several: --variant="--dtype=bfloat16 --attention=cudnn"). Every variant is compiled and
initialized, then the rounds run one step of each variant in turn, so that a shared machine's
changing load hits all of them alike (separate runs on a busy CPU differ by 2x from load alone).
Prints one JSON line per variant (the base first): compile time, XLA's static memory plan, the
median step time, model FLOP/s, and `step_time_vs_base`: the median over rounds of its step time
over the base's step time in the same round (< 1: faster than the base). With --measure_matmul,
one matmul timing per round gives the yardstick (model FLOP/s / matmul FLOP/s).
Needs what bench/train_throughput.py needs; no tensorflow, clu or grain.
"""

import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import benchlib  # noqa: E402
from bench.train_throughput import abstract_batch, configure, parse  # noqa: E402
from fvdm_jax.training.flops import model_flops_from_config  # noqa: E402
from fvdm_jax.training.loop import create_state  # noqa: E402
from fvdm_jax.training.setup import build_setup  # noqa: E402
from fvdm_jax.training.step import JittedTrainStep  # noqa: E402


class Variant:
    def __init__(self, name, argv):
        self.name = name
        self.args = parse(argv)
        self.config = configure(self.args)
        setup = build_setup(self.config)
        model = setup.model
        step = JittedTrainStep(
            model, setup.schedule, setup.optimizer, self.config.train, self.config.ptss,
            setup.state_shardings, setup.batch_shardings, mesh=setup.mesh, rules=setup.rules,
        )
        b = int(self.config.train.batch_size)
        shape = (b, model.num_frames, model.input_size, model.input_size, model.in_channels)
        started = time.perf_counter()
        lowered = step.lower(setup.abstract_state, abstract_batch(setup, shape, b))
        self.lower_s = time.perf_counter() - started
        started = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - started
        self.state = create_state(setup, int(self.config.train.seed))
        rng = np.random.default_rng(0)
        self.batch = {
            "video": jax.device_put(
                rng.standard_normal(shape, dtype=np.float32), setup.batch_shardings["video"]
            ),
            "label": jax.device_put(np.zeros((b,), np.int32), setup.batch_shardings["label"]),
        }
        self.batch_size = b
        self.devices = setup.mesh.size
        self.flops_per_step = 3 * model_flops_from_config(self.config.model) * b
        self.times = []
        self.metrics = None
        self.warmup_s = self.step()

    def step(self) -> float:
        started = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.metrics)
        return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    parser.add_argument("--variant", action="append", default=[],
                        help="flags added to the base for one variant (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    ours, base_argv = parser.parse_known_args(argv)
    load_before = benchlib.load_average()
    names = ["base"] + ours.variant
    variants = [Variant(name, base_argv + (shlex.split(name) if name != "base" else []))
                for name in names]
    base_args = variants[0].args
    measure = base_args.measure_matmul
    dtype = variants[0].config.model.dtype
    size = (benchlib.parse_sizes(base_args.matmul_sizes) or (1024,))[0]
    rates = []
    for _ in range(ours.rounds):
        for variant in variants:
            variant.times.append(variant.step())
        if measure:
            rates.append(benchlib.matmul_rate(size, dtype)["flops_per_s"])
    base_times = variants[0].times
    matmul = benchlib.median(rates) if rates else base_args.matmul_peak
    matmul_devices = 1 if jax.default_backend() == "cpu" else variants[0].devices
    for variant in variants:
        step_s = benchlib.median(variant.times)
        achieved = variant.flops_per_step / step_s
        model = variant.config.model
        benchlib.emit(benchlib.record(
            "train_ab",
            variant=variant.name,
            config=base_args.config,
            model={k: model[k] for k in (
                "size", "patch_size", "num_frames", "input_size", "in_channels", "dtype",
                "param_dtype", "remat", "attention", "scan_layers")},
            donate_state=bool(variant.config.train.donate_state),
            batch=variant.batch_size,
            devices=variant.devices,
            rounds=ours.rounds,
            lower_s=round(variant.lower_s, 3),
            compile_s=round(variant.compile_s, 3),
            memory_plan=benchlib.memory_analysis(variant.compiled),
            warmup_step_s=round(variant.warmup_s, 5),
            step_times_s=[round(t, 4) for t in variant.times],
            step_s=round(step_s, 5),
            step_time_vs_base=round(benchlib.median(
                [t / b for t, b in zip(variant.times, base_times)]), 4),
            videos_per_s=round(variant.batch_size / step_s, 5),
            model_flops_per_s=achieved,
            matmul_flops_per_s=matmul,
            matmul_size=size if rates else None,
            model_flops_over_matmul=round(achieved / (matmul * matmul_devices), 4)
            if matmul else None,
            loss=float(jax.device_get(variant.metrics["loss"])),
        ), load_before)


if __name__ == "__main__":
    main()
