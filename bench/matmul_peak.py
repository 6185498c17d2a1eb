"""The machine's own achievable matmul FLOP/s: the yardstick for model FLOP/s on CPU.

    python bench/matmul_peak.py [--dtypes=float32,bfloat16] [--sizes=512,1024,2048,3072]
                                [--repeats=3]

Times a jitted square (N x N) @ (N x N) jnp.dot per size and dtype on one device (half precision
inputs accumulate in float32) and prints one JSON line per (dtype, size) and one line per dtype
with the best rate ("result": "best"). A CPU has no vendor peak worth quoting, so train_throughput
and sample_latency report their model FLOP/s as a ratio to this rate (their --measure_matmul
runs it in the same process). Default sizes: 512/1024/2048/3072 on CPU, 4096/8192/16384
elsewhere.
Needs jax and numpy only (no tensorflow, clu, grain or ml_collections).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import benchlib  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--sizes", default=None, help="comma-separated N (default by backend)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per size; the best counts")
    args = parser.parse_args(argv)
    sizes = benchlib.parse_sizes(args.sizes) or benchlib.default_matmul_sizes()
    for dtype in args.dtypes.split(","):
        load = benchlib.load_average()
        results = []
        for size in sizes:
            load_size = benchlib.load_average()
            rate = benchlib.matmul_rate(size, dtype, repeats=args.repeats)
            results.append(rate)
            benchlib.emit(benchlib.record("matmul_peak", result="size", **rate), load_size)
        best = max(results, key=lambda r: r["flops_per_s"])
        benchlib.emit(
            benchlib.record(
                "matmul_peak",
                result="best",
                dtype=dtype,
                size=best["size"],
                flops_per_s=best["flops_per_s"],
                sizes=list(sizes),
            ),
            load,
        )


if __name__ == "__main__":
    main()
