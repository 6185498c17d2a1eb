"""The PTSS ablation: one model per PTSS probability p on the same data, seed and step count, each
evaluated by FVD on generate, i2v, interpolate and extend (twice the trained length).

    python -m fvdm_jax.experiments.ptss --data=DIR --out=OUT [--p=0,0.2,0.5,1] [--steps=N]
        [--seed=S] [--config=configs/demo.py] [--tasks=generate,i2v,interpolate,extend]
        [--eval_seeds=0,1] [--num_videos=32] [--dataset=ffs] [--set=section.key=value ...]

DIR is a folder of videos or frame folders (the video_folder source, with --dataset's clip rules,
>= 8 usable videos), or `demo` for the shipped clips (the demo source as the config sets it up,
without its held-out frames: as for a folder, FVD's real clips are drawn from the training clips).
The recipe is the config's (configs/demo.py unless --config): only ptss.p, train.num_steps and
the seeds differ between the models. Each model trains in OUT/p<p>/ (an ordinary workdir: it
resumes, and `--mode=sample` works on it); each (p, task, evaluation seed) FVD is stored in
OUT/p<p>/fvd/<task>_seed<s>.json, so a rerun skips finished models and evaluations.

FVD: `--num_videos` generated videos per (p, task, seed) against real clips of DIR (StyleGAN-V's
protocol: the train split, every video then its mirror image), 16 frames (the model's
window) and, for extend, twice the window: the model continues the first half of a real clip of
that length. The real clips of an evaluation seed are the same for every p, and i2v, interpolate
and extend are conditioned on them. Outputs:
  OUT/results.json  every (p, task, seed) row
  OUT/results.md    the p x task table: mean FVD over the evaluation seeds and their spread
  OUT/results.png   FVD vs p, one line per task (the spread as error bars)
  OUT/sheets/p<p>_<task>.png  the first evaluated videos of each (p, task), enlarged
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from fvdm_jax import files
from fvdm_jax.diffusion.tasks import EVAL_TASKS, get_task

TASKS = EVAL_TASKS  # the tasks evaluation can score (fvdm_jax/diffusion/tasks.py)
MIN_VIDEOS = 8
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.py"


class ExperimentError(ValueError):
    """Bad input to the experiment: reported in one line."""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m fvdm_jax.experiments.ptss",
        description="Train one model per PTSS probability p and compare their FVDs.")
    parser.add_argument("--data", required=True, help="a folder of videos, or 'demo'")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--p", default="0,0.2,0.5,1", help="PTSS probabilities, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="model, data and noise seed of every run")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the recipe (a configs/*.py file)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"some of {','.join(TASKS)}")
    parser.add_argument("--eval_seeds", default="0,1", help="evaluation seeds (>= 2 give a spread)")
    parser.add_argument("--num_videos", type=int, default=32, help="videos per FVD")
    parser.add_argument("--dataset", default=None, help="clip rules of a folder: ffs / sky / ucf101 / taichi")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other config override (repeatable)")
    return parser.parse_args(argv)


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ExperimentError(f"--{name}={text!r}: give comma-separated numbers, e.g. 0,0.2,0.5,1") from None
    if not values:
        raise ExperimentError(f"--{name} is empty")
    return values


def _value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_args(args) -> tuple[list[float], list[str], list[int]]:
    """(p values, tasks, evaluation seeds), or ExperimentError naming the bad argument."""
    ps = _floats(args.p, "p")
    bad = [p for p in ps if not 0.0 <= p <= 1.0 or math.isnan(p)]
    if bad:
        raise ExperimentError(f"--p={args.p}: every p must be in [0, 1] (got {bad})")
    if len(set(ps)) != len(ps):
        raise ExperimentError(f"--p={args.p} repeats a value")
    if args.steps is not None and args.steps < 1:
        raise ExperimentError(f"--steps={args.steps} must be >= 1")
    if args.num_videos < 2:
        raise ExperimentError(f"--num_videos={args.num_videos} must be >= 2 (FVD needs a covariance)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ExperimentError(f"--tasks={args.tasks}: unknown task(s) {unknown}; use some of {','.join(TASKS)}")
    try:
        seeds = [int(s) for s in args.eval_seeds.split(",") if s.strip()]
    except ValueError:
        raise ExperimentError(f"--eval_seeds={args.eval_seeds!r}: give integers, e.g. 0,1") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ExperimentError(f"--eval_seeds={args.eval_seeds}: give distinct integers >= 0")
    return ps, tasks, seeds


def base_config(args):
    """The recipe with the data, seeds and overrides applied (ptss.p is set per model)."""
    from fvdm_jax.config_utils import load_config

    if not os.path.isfile(args.config):
        raise ExperimentError(f"--config={args.config} does not exist; pass a configs/*.py file")
    config = load_config(args.config)
    if args.data != "demo":
        config.data.source = "video_folder"
        config.data.path = args.data
        config.data.dataset = args.dataset or config.data.get("dataset") or "ffs"
        config.eval.real_path = args.data
        if config.data.dataset != "ucf101":  # a folder's videos carry no classes
            config.model.num_classes = 0
            config.sample.cfg_scale = 1.0
    elif config.data.source != "demo":
        raise ExperimentError(f"--data=demo needs a config whose data.source is 'demo' ({args.config} "
                              f"has {config.data.source!r})")
    else:
        # As for a folder, real clips come from the training clips: the demo's held-out frames
        # are too few for extend's clips of twice the window.
        config.data.hold_out_frames = 0
    if args.steps is not None:
        config.train.num_steps = int(args.steps)
    config.train.seed = int(args.seed)
    config.data.seed = int(args.seed)
    config.eval.after_training = ()  # the experiment evaluates itself
    config.sample.every_steps = 0
    config.eval.every_steps = 0
    config.checkpoint.every_steps = int(config.train.num_steps)
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in config or name not in config[section]:
            raise ExperimentError(f"--set {item}: unknown config key {key}")
        config[section][name] = _value(value)
    if config.data.source == "video_folder" and not any(i.startswith("data.image_size=") for i in args.set):
        config.data.image_size = int(config.model.input_size)  # a pixel-space recipe
    # The real clips of FVD follow the training clips' frame stride.
    config.eval.subsample_factor = int(config.data.frame_interval)
    return config


def check_data(config) -> str:
    """One line describing the training data, or ExperimentError for unusable data."""
    if config.data.source == "demo":
        from fvdm_jax.data.demo import DemoClipSource, demo_options

        try:
            source = DemoClipSource(num_examples=int(config.data.num_examples), num_frames=int(config.model.num_frames),
                                    image_size=int(config.model.input_size),
                                    frame_interval=int(config.data.frame_interval),
                                    **demo_options(config.data))
        except ValueError as error:
            raise ExperimentError(str(error)) from None
        return source.describe()
    from fvdm_jax.data.folder import VideoFolderSource

    path = config.data.path
    if not os.path.isdir(path):
        raise ExperimentError(f"--data={path} is not a folder of videos (or 'demo')")
    try:
        source = VideoFolderSource(path, dataset=config.data.dataset,
                                   num_frames=int(config.model.num_frames),
                                   frame_interval=int(config.data.frame_interval),
                                   image_size=int(config.model.input_size))
    except (ValueError, FileNotFoundError) as error:
        raise ExperimentError(f"--data={path}: {error}") from None
    if len(source.entries) < MIN_VIDEOS:
        raise ExperimentError(
            f"--data={path} has {len(source.entries)} usable videos ({source.num_too_short} too short "
            f"for {source.min_frames} frames, {source.num_unreadable} unreadable); the ablation needs "
            f">= {MIN_VIDEOS}")
    return source.describe()


def p_name(p: float) -> str:
    return f"p{p:g}"


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def train_model(config, workdir: str) -> None:
    """Trains (or finishes training) one model; a finished one is left alone."""
    from fvdm_jax.checkpoint import TrainCheckpointer
    from fvdm_jax.train import train

    ckpt = TrainCheckpointer(workdir, config.checkpoint)
    latest = ckpt.latest_step()
    ckpt.close()
    if latest is not None and latest >= int(config.train.num_steps):
        logging.info("%s: trained (step %d), skipped", workdir, latest)
        return
    result = train(config, workdir)
    if result.preempted:
        raise KeyboardInterrupt(f"training of {workdir} was interrupted at step {result.step}; rerun to resume")


class RealSets:
    """The real clips and statistics of one (frames, seed), shared by every p."""

    def __init__(self, config, detector, batch: int, cache_dir: str, resolution: int):
        self.config, self.detector, self.batch = config, detector, batch
        self.cache_dir, self.resolution = cache_dir, resolution
        self._sets = {}

    def get(self, num_frames: int, seed: int, num_videos: int):
        from fvdm_jax.evaluation.features import protocol_from_config, real_statistics
        from fvdm_jax.evaluation.videos import open_real

        key = (num_frames, seed, num_videos)
        if key not in self._sets:
            config = self.config.copy_and_resolve_references()
            config.eval.seed = seed
            protocol = protocol_from_config(config, num_frames, self.resolution, num_videos=num_videos)
            real = open_real(config, protocol, labels=int(config.model.num_classes or 0) > 0)
            stats, _ = real_statistics(real, protocol, self.detector, self.cache_dir, self.batch,
                                       int(config.eval.num_workers))
            self._sets[key] = (real, stats)
        return self._sets[key]


def evaluate_model(config, workdir: str, p: float, tasks, seeds, num_videos: int, reals: RealSets,
                   sheets_dir: str) -> list[dict]:
    """The FVD rows of one model, computing only those not stored yet."""
    from fvdm_jax import media
    from fvdm_jax.evaluation.features import task_features
    from fvdm_jax.evaluation.fvd import detector_batch_size, fvd_from_stats
    from fvdm_jax.sampling.sampler import VideoSampler
    from fvdm_jax.sampling.weights import load_sampling_params

    rows, sampler = [], None
    window = int(config.model.num_frames)
    for task in tasks:
        for seed in seeds:
            path = os.path.join(workdir, "fvd", f"{task}_seed{seed}.json")
            if os.path.isfile(path):
                rows.append(_read_json(path))
                continue
            if sampler is None:
                model_config, diffusion_config, params = load_sampling_params(config, workdir)
                sampler = VideoSampler.from_config(config, params, model_config=model_config,
                                                   diffusion_config=diffusion_config)
            frames = 2 * window if get_task(task).long else window
            task_config = config.copy_and_resolve_references()
            if get_task(task).long:
                task_config.sample.total_frames = frames
            batch = detector_batch_size(int(config.eval.batch_size), frames, reals.detector.batch_divisor)
            real, real_stats = reals.get(frames, seed, num_videos)
            keep, clock = [], time.perf_counter()
            stats = task_features(task_config, sampler, reals.detector, batch, real, real_stats, task,
                                  num_videos, frames, seed, keep=keep,
                                  conditional=sampler.num_classes > 0)
            row = {"p": p, "task": task, "seed": seed, "fvd": fvd_from_stats(real_stats, stats),
                   "num_generated": int(stats.count), "num_real": int(real_stats.count),
                   "num_frames": frames, "steps": int(config.train.num_steps),
                   "seconds": time.perf_counter() - clock, "detector": reals.detector.name}
            files.write_json(path, row)
            rows.append(row)
            if seed == seeds[0] and keep:
                videos = np.stack(keep)
                scale = media.sheet_scale(videos.shape[2], int(config.sample.get("sheet_frame_size", 1)))
                os.makedirs(sheets_dir, exist_ok=True)
                media.write_png(os.path.join(sheets_dir, f"{p_name(p)}_{task}.png"),
                                media.frame_grid(videos, scale=scale))
            logging.info("p=%g %s seed %d: FVD %.1f", p, task, seed, row["fvd"])
    return rows


def summarize(rows: list[dict], ps, tasks) -> dict:
    """{(p, task): (mean, spread, count)} with spread = max - min over the evaluation seeds."""
    table = {}
    for p in ps:
        for task in tasks:
            values = [r["fvd"] for r in rows if r["p"] == p and r["task"] == task]
            if values:
                table[(p, task)] = (sum(values) / len(values), max(values) - min(values), len(values))
    return table


def results_markdown(table: dict, ps, tasks, info: dict) -> str:
    lines = [f"# PTSS ablation: FVD (lower is better), mean over {info['num_seeds']} evaluation seeds "
             f"(± half the max-min spread)", "",
             f"data: {info['data']}  ", f"recipe: {info['config']}, {info['steps']} steps, seed "
             f"{info['seed']}; {info['num_videos']} videos per FVD; {info['frames']} frames (extend: "
             f"{2 * info['frames']})", "",
             "| p | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for p in ps:
        cells = []
        for task in tasks:
            mean, spread, _ = table.get((p, task), (float("nan"), float("nan"), 0))
            best = min(table.get((q, task), (float("inf"),))[0] for q in ps)
            text = f"{mean:.1f} ± {spread / 2:.1f}"
            cells.append(f"**{text}**" if mean == best else text)
        lines.append(f"| {p:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_plot(table: dict, ps, tasks, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        logging.warning("no results plot (%s): pip install matplotlib", error)
        return None
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for task in tasks:
        xs = [p for p in ps if (p, task) in table]
        means = [table[(p, task)][0] for p in xs]
        errors = [table[(p, task)][1] / 2 for p in xs]
        axis.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=task)
    axis.set_xlabel("PTSS probability p")
    axis.set_ylabel("FVD (lower is better)")
    axis.set_title("PTSS ablation")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary)
    plt.close(figure)
    return path


def run(argv) -> dict:
    """The whole experiment; returns the summary written to OUT/results.json."""
    args = parse_args(argv)
    ps, tasks, seeds = check_args(args)
    config = base_config(args)
    described = check_data(config)
    import jax

    from fvdm_jax import sharding as shd
    from fvdm_jax.evaluation.fvd import detector_batch_size, load_detector
    from fvdm_jax.train import validate_config

    try:
        validate_config(config, near=args.config)
    except ValueError as error:
        raise ExperimentError(str(error)) from None
    os.makedirs(args.out, exist_ok=True)
    logging.info("PTSS ablation: p=%s, tasks %s, eval seeds %s; data: %s", ps, tasks, seeds, described)
    started = time.perf_counter()
    mesh = shd.make_mesh(config.mesh)
    detector = load_detector(config.eval.detector, mesh, shd.rules_from_config(config.mesh))
    batch = detector_batch_size(int(config.eval.batch_size), int(config.model.num_frames),
                                detector.batch_divisor)
    resolution = int(config.model.input_size)
    reals = RealSets(config, detector, batch, os.path.join(args.out, "fvd_cache"), resolution)
    rows = []
    for p in ps:
        model_config = config.copy_and_resolve_references()
        model_config.ptss.p = float(p)
        workdir = os.path.join(args.out, p_name(p))
        evaluated = all(os.path.isfile(os.path.join(workdir, "fvd", f"{t}_seed{s}.json"))
                        for t in tasks for s in seeds)
        if not evaluated:  # a model whose FVDs are all stored needs no weights (nor training)
            train_model(model_config, workdir)
        rows += evaluate_model(model_config, workdir, p, tasks, seeds, args.num_videos, reals,
                               os.path.join(args.out, "sheets"))
    table = summarize(rows, ps, tasks)
    info = {"data": described, "config": args.config, "steps": int(config.train.num_steps),
            "seed": args.seed, "num_videos": args.num_videos, "num_seeds": len(seeds),
            "frames": int(config.model.num_frames)}
    summary = {"info": info, "rows": rows, "command": " ".join(["python -m fvdm_jax.experiments.ptss"] + list(argv)),
               "seconds_this_run": time.perf_counter() - started,
               "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
               "table": [{"p": p, "task": t, "mean": m, "spread": s, "seeds": n}
                         for (p, t), (m, s, n) in table.items()]}
    if jax.process_index() == 0:
        files.write_json(os.path.join(args.out, "results.json"), summary)
        markdown = results_markdown(table, ps, tasks, info)
        files.write_text(os.path.join(args.out, "results.md"), markdown)
        results_plot(table, ps, tasks, os.path.join(args.out, "results.png"))
        print(markdown, flush=True)
        print(f"results: {args.out}/results.{{json,md,png}}; sheets: {args.out}/sheets/", flush=True)
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (ExperimentError, FileNotFoundError) as error:
        print(f"fvdm_jax.experiments.ptss: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
