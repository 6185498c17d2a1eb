"""Analytic model FLOPs per video of every size (fvdm_jax/training/flops.py) and the per-frame adaLN saving.

    python bench/flops_table.py [--sizes=S,B,L,XL] [--patch_size=2] [--num_frames=16]
                                [--input_size=32] [--in_channels=4]

One JSON line per size: the forward FLOPs of one video, the training FLOPs (3 x forward), the
breakdown (qkv/proj, attention scores, MLP, adaLN, ...), and what the official model's adaLN
costs: the official PyTorch code repeats the conditioning to every token of the temporal blocks
and runs the D -> 6D modulation per token; this model runs it once per frame and broadcasts
(numerically identical). For XL/2 on 16 x 32x32x4 latents: 3.73 TFLOP forward, 11.2 TFLOP per
training video, and the official form would add 0.910 TFLOP (+24.4%) to the forward.
No computation: nothing is timed, the figures are exact counts of matmul FLOPs.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import benchlib  # noqa: E402
from fvdm_jax.models.dit import MODEL_SIZES  # noqa: E402
from fvdm_jax.training.flops import BREAKDOWN_KEYS, dit_forward_flops  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="S,B,L,XL")
    parser.add_argument("--patch_size", type=int, default=2)
    parser.add_argument("--num_frames", type=int, default=16)
    parser.add_argument("--input_size", type=int, default=32)
    parser.add_argument("--in_channels", type=int, default=4)
    args = parser.parse_args(argv)
    for size in args.sizes.split(","):
        hidden, depth, heads = MODEL_SIZES[size]
        kwargs = dict(
            input_size=args.input_size, patch_size=args.patch_size,
            in_channels=args.in_channels, hidden_size=hidden, depth=depth, num_heads=heads,
            num_frames=args.num_frames,
        )
        ours = dit_forward_flops(**kwargs)
        official = dit_forward_flops(**kwargs, per_token_temporal_adaln=True)
        extra = official["total"] - ours["total"]
        benchlib.emit(benchlib.record(
            "flops_table",
            size=size,
            model=kwargs,
            forward_flops_per_video=ours["total"],
            train_flops_per_video=3 * ours["total"],
            breakdown={k: ours[k] for k in BREAKDOWN_KEYS},
            official_per_token_adaln_forward_flops=official["total"],
            per_frame_adaln_saving_flops=extra,
            per_frame_adaln_saving_percent_of_forward=round(100 * extra / ours["total"], 2),
        ), benchlib.load_average())


if __name__ == "__main__":
    main()
