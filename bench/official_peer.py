"""Our train step beside the official PyTorch FVDM train step, timed in alternation in ONE run.

    python bench/official_peer.py --official=/path/to/FVDM [--size=S] [--rounds=5] \\
        [--variant="--unroll --remat=dots"] [--torch_threads=N]

`--official` is a checkout of github.com/Yaofang-Liu/FVDM (its models/latte_video.py and
diffusion/). Needs torch (CPU is enough), timm and einops besides our own requirements; our code
never imports theirs anywhere but here. Both sides train the same shapes: LatteVIDEO-<size>/2,
unconditional, fp32, batch --batch_size, 16 x 4 x 32 x 32 latents, the hybrid loss (MSE on the eps
channels + the learned-range VB term), PTSS p = 0.2, global grad norm, AdamW (lr 1e-4, wd 0) and
the EMA update; theirs is their `training_losses_video` + the loop body of their train_video.py
(the grad norm computed, no clipping, as before their clip start), ours the real jitted, donated
train step of fvdm_jax.training.step (bench/train_throughput.py's flags; each --variant adds flags).
Every round runs one step of each side (ours first, then theirs, then each variant), so a shared
machine's load hits all alike; a matmul yardstick (jax, the same size) is timed each round with
--measure_matmul. Prints one JSON line per side: median step time, model FLOP/s from our exact
analytic count (the same count for both: theirs does more, as its adaLN runs per token), and
`speedup_vs_official` = the median over rounds of (their step time / our step time in that round).
"""

import argparse
import importlib.util
import os
import shlex
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench import benchlib  # noqa: E402


class Official:
    """Their model, diffusion and optimizer; one call to `step` is one training step."""

    def __init__(self, path, size, batch, frames, latent, channels, p, seed, threads):
        import torch

        if threads:
            torch.set_num_threads(threads)
        path = os.path.abspath(path)
        if not os.path.isfile(os.path.join(path, "models", "latte_video.py")):
            raise SystemExit(f"--official={path} has no models/latte_video.py: pass a checkout of "
                             "github.com/Yaofang-Liu/FVDM")
        sys.path.insert(0, path)
        # Their model module imports the ipdb debugger at the top (its breakpoints are commented
        # out); an empty module stands in when it is not installed.
        sys.modules.setdefault("ipdb", types.ModuleType("ipdb"))
        from diffusion import create_diffusion

        # Their models/__init__.py imports the text-to-video model and diffusers; the video model
        # file is loaded on its own.
        spec = importlib.util.spec_from_file_location(
            "official_latte_video", os.path.join(path, "models", "latte_video.py"))
        latte_video = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(latte_video)
        LatteVIDEO_models = latte_video.LatteVIDEO_models

        torch.manual_seed(seed)
        self.torch = torch
        self.model = LatteVIDEO_models[f"LatteVIDEO-{size}/2"](
            input_size=latent, in_channels=channels, num_frames=frames, extras=1, learn_sigma=True)
        self.model.train()
        self.ema = LatteVIDEO_models[f"LatteVIDEO-{size}/2"](
            input_size=latent, in_channels=channels, num_frames=frames, extras=1, learn_sigma=True)
        self.ema.load_state_dict(self.model.state_dict())
        for param in self.ema.parameters():
            param.requires_grad_(False)
        self.diffusion = create_diffusion(timestep_respacing="")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0)
        self.shape = (batch, frames, channels, latent, latent)
        self.p = p
        self.x = torch.randn(self.shape)
        self.parameters = sum(v.numel() for v in self.model.parameters())

    def step(self) -> float:
        torch = self.torch
        started = time.perf_counter()
        b, f = self.shape[:2]
        t = torch.randint(0, self.diffusion.num_timesteps, (b, 1)).repeat(1, f)
        if torch.rand(1).item() < self.p:
            t = torch.randint(0, self.diffusion.num_timesteps, (b, f))
        terms = self.diffusion.training_losses_video(self.model, self.x, t, dict(y=None))[0]
        loss = terms["loss"].mean()
        loss.backward()
        grads = [v.grad for v in self.model.parameters() if v.grad is not None]
        self.grad_norm = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            ema = dict(self.ema.named_parameters())
            for name, param in self.model.named_parameters():
                ema[name].mul_(0.9999).add_(param.data, alpha=1 - 0.9999)
        self.loss = loss.item()
        return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="a checkout of Yaofang-Liu/FVDM")
    parser.add_argument("--size", default="S", choices=["S", "B", "L", "XL"])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[],
                        help="flags of bench/train_throughput.py added to ours (repeatable)")
    parser.add_argument("--torch_threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own, the core count)")
    parser.add_argument("--measure_matmul", action="store_true")
    parser.add_argument("--matmul_size", type=int, default=1024)
    ours, rest = parser.parse_known_args(argv)

    import jax

    from bench.train_ab import Variant

    load_before = benchlib.load_average()
    base = ["--config=configs/ffs_xl.py", f"--size={ours.size}",
            f"--batch_size={ours.batch_size}", "--mesh=1,1,1"] + rest
    sides = [Variant("ours", base)] + [Variant(v, base + shlex.split(v)) for v in ours.variant]
    model_cfg = sides[0].config.model
    official = Official(
        ours.official, ours.size, ours.batch_size, int(model_cfg.num_frames),
        int(model_cfg.input_size), int(model_cfg.in_channels), float(sides[0].config.ptss.p),
        int(sides[0].config.train.seed), ours.torch_threads)
    official.step()  # warm-up (allocator, autograd graph)
    official_times, rates = [], []
    for _ in range(ours.rounds):
        for side in sides:
            side.times.append(side.step())
        official_times.append(official.step())
        if ours.measure_matmul:
            rates.append(benchlib.matmul_rate(ours.matmul_size, "float32")["flops_per_s"])
    flops = sides[0].flops_per_step
    matmul = benchlib.median(rates) if rates else None
    official_s = benchlib.median(official_times)
    common = dict(size=ours.size, batch=ours.batch_size, rounds=ours.rounds,
                  shape=list(official.shape), matmul_flops_per_s=matmul,
                  model_flops_per_step=flops)
    benchlib.emit(benchlib.record(
        "official_peer", side="official", step_s=round(official_s, 5),
        step_times_s=[round(t, 4) for t in official_times],
        parameters=official.parameters, torch_threads=official.torch.get_num_threads(),
        torch_version=official.torch.__version__, loss=official.loss,
        model_flops_per_s=flops / official_s,
        model_flops_over_matmul=round(flops / official_s / matmul, 4) if matmul else None,
        **common), load_before)
    for side in sides:
        step_s = benchlib.median(side.times)
        benchlib.emit(benchlib.record(
            "official_peer", side=side.name, step_s=round(step_s, 5),
            step_times_s=[round(t, 4) for t in side.times],
            parameters=int(sum(np.prod(v.shape) for v in jax.tree.leaves(side.state.params))),
            compile_s=round(side.compile_s, 3), loss=float(jax.device_get(side.metrics["loss"])),
            speedup_vs_official=round(benchlib.median(
                [o / s for o, s in zip(official_times, side.times)]), 4),
            model_flops_per_s=flops / step_s,
            model_flops_over_matmul=round(flops / step_s / matmul, 4) if matmul else None,
            **common), load_before)


if __name__ == "__main__":
    main()
