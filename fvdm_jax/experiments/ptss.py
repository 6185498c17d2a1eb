"""The training-timestep experiment: one model per scheme (PTSS at several p by default) on the
same data, seed and step count, each evaluated by FVD on generate, i2v, interpolate and extend
(twice the trained length).

    python -m fvdm_jax.experiments.ptss --data=DIR --out=OUT [--p=0,0.2,0.5,1 | --schemes=...]
        [--history_guidance=0,1.5,3] [--steps=N] [--seed=S] [--config=configs/demo.py]
        [--tasks=generate,i2v,interpolate,extend] [--eval_seeds=0,1] [--num_videos=32]
        [--dataset=ffs] [--set=section.key=value ...]

DIR is a folder of videos or frame folders (the video_folder source, with --dataset's clip rules,
>= 8 usable videos), or `demo` for the shipped clips (the demo source as the config sets it up,
without its held-out frames: as for a folder, FVD's real clips are drawn from the training clips).
The recipe is the config's (configs/demo.py unless --config): only ptss.scheme, ptss.p,
train.num_steps and the seeds differ between the models.

--schemes lists the models as scheme[:p] over the `ptss.scheme` registry, e.g.
`--schemes=ptss:0.2,ptss:0,independent,fopp,ptss_fopp:0.5` (ptss or ptss_fopp without :p take the
config's ptss.p; independent and fopp have no coin and take no p). `--p=0,0.2` is shorthand for
`--schemes=ptss:0,ptss:0.2`, and `--p=0,0.2,0.5,1` is the default. `--history_guidance=0,1.5,3`
evaluates the zero-shot tasks (i2v, interpolate, extend) once per scale of
sample.history_guidance (0 = off); generate has no history frames and is evaluated once.

Each model trains in OUT/<run>/ (p<p> for PTSS, as earlier versions named it; independent, fopp,
ptss_fopp_p<p>): an ordinary workdir that resumes, and `--mode=sample` works on it. Each FVD is
stored in OUT/<run>/fvd/<task>_seed<s>.json (<task>_hg<g>_seed<s>.json with history guidance
g > 0; _hg<g>_fractional<tau> in sample.history_guidance_mode=fractional), so a rerun skips
finished models and evaluations.

FVD: `--num_videos` generated videos per (run, task, guidance, seed) against real clips of DIR
(StyleGAN-V's protocol: the train split, every video then its mirror image), 16 frames (the
model's window) and, for extend, twice the window: the model continues the first half of a real
clip of that length. The real clips of an evaluation seed are the same for every run, and i2v,
interpolate and extend are conditioned on them. Outputs:
  OUT/results.json  every row
  OUT/results.md    the run (x guidance) x task table: mean FVD over the evaluation seeds and
                    their spread (the p x task table when every run is PTSS)
  OUT/results.png   FVD per run (vs p when every run is PTSS), one line per task (and guidance)
  OUT/sheets/<run>_<task>[_hg<g>].png  the first evaluated videos of each, enlarged
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

from fvdm_jax.diffusion.schemes import COIN_SCHEMES, SCHEMES
from fvdm_jax.diffusion.tasks import EVAL_TASKS, get_task
from fvdm_jax.experiments.results import (
    Run,
    evaluations,
    fvd_name,
    guidance_tag,
    results_markdown,
    results_plot,
    summarize,
)
from fvdm_jax.runtime import files

TASKS = EVAL_TASKS  # the tasks evaluation can score (fvdm_jax/diffusion/tasks.py)
MIN_VIDEOS = 8
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.py"


class ExperimentError(ValueError):
    """Bad input to the experiment: reported in one line."""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m fvdm_jax.experiments.ptss",
        description="Train one model per training timestep scheme (PTSS p by default) and "
                    "compare their FVDs.")
    parser.add_argument("--data", required=True, help="a folder of videos, or 'demo'")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--p", default=None,
                        help="PTSS probabilities, comma-separated (default 0,0.2,0.5,1): "
                             "--schemes=ptss:P,... in short")
    parser.add_argument("--schemes", default=None, metavar="SCHEME[:P],...",
                        help=f"models as scheme[:p], scheme one of {','.join(SCHEMES)}, "
                             "e.g. ptss:0.2,ptss:0,independent,fopp")
    parser.add_argument("--history_guidance", default=None, metavar="G,...",
                        help="history guidance scales of the zero-shot tasks (sample.history_guidance; "
                             "0 = off), e.g. 0,1.5,3")
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


def parse_schemes(text: str) -> list[Run]:
    """'ptss:0.2,independent,...' -> runs (p None where the item gives none), or ExperimentError."""
    runs = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        scheme, colon, value = item.partition(":")
        if scheme not in SCHEMES:
            raise ExperimentError(f"--schemes={text}: unknown scheme {scheme!r}; use some of "
                                  f"{','.join(SCHEMES)}, each as scheme[:p]")
        if not colon:
            runs.append(Run(scheme, None))
            continue
        if scheme not in COIN_SCHEMES:
            raise ExperimentError(f"--schemes={text}: {scheme} has no coin and takes no p; write "
                                  f"{scheme} (p applies to {', '.join(COIN_SCHEMES)})")
        try:
            p = float(value)
        except ValueError:
            raise ExperimentError(f"--schemes={text}: {item!r} needs a number after ':', e.g. "
                                  f"{scheme}:0.2") from None
        if not 0.0 <= p <= 1.0 or math.isnan(p):
            raise ExperimentError(f"--schemes={text}: every p must be in [0, 1] (got {item})")
        runs.append(Run(scheme, p))
    if not runs:
        raise ExperimentError("--schemes is empty; give e.g. --schemes=ptss:0.2,fopp")
    return runs


def check_args(args) -> tuple[list[Run], list[str], list[int], list[float] | None]:
    """(runs, tasks, evaluation seeds, history guidance scales or None), or ExperimentError
    naming the bad argument. A PTSS run without p has p None until `resolve_runs`."""
    if args.p is not None and args.schemes is not None:
        raise ExperimentError(f"give --p or --schemes, not both (--p={args.p} is "
                              f"--schemes={','.join('ptss:' + v.strip() for v in args.p.split(','))})")
    if args.schemes is None:
        text = "0,0.2,0.5,1" if args.p is None else args.p
        ps = _floats(text, "p")
        bad = [p for p in ps if not 0.0 <= p <= 1.0 or math.isnan(p)]
        if bad:
            raise ExperimentError(f"--p={text}: every p must be in [0, 1] (got {bad})")
        if len(set(ps)) != len(ps):
            raise ExperimentError(f"--p={text} repeats a value")
        runs = [Run("ptss", p) for p in ps]
    else:
        runs = parse_schemes(args.schemes)
    guidances = None
    if args.history_guidance is not None:
        guidances = _floats(args.history_guidance, "history_guidance")
        if any(g < 0 or math.isnan(g) for g in guidances) or len(set(guidances)) != len(guidances):
            raise ExperimentError(f"--history_guidance={args.history_guidance}: give distinct "
                                  f"scales >= 0 (0 = off), e.g. 0,1.5,3")
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
    return runs, tasks, seeds, guidances


def resolve_runs(runs: list[Run], config) -> list[Run]:
    """Gives a coin scheme without p the config's ptss.p; ExperimentError on a repeated run."""
    resolved = [Run(r.scheme, float(config.ptss.p)) if r.p is None and r.scheme in COIN_SCHEMES
                else r for r in runs]
    names = [r.name for r in resolved]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ExperimentError(f"the runs repeat {', '.join(repeated)} (a scheme without :p takes "
                              f"the config's ptss.p={config.ptss.p:g}); list each model once")
    return resolved


def run_config(config, run: Run):
    """The recipe of one model: the base config with the run's scheme (and p)."""
    model_config = config.copy_and_resolve_references()
    model_config.ptss.scheme = run.scheme
    if run.p is not None:
        model_config.ptss.p = float(run.p)
    return model_config


def guided_config(config, guidance: float | None):
    """The config a task is sampled with: sample.history_guidance set where it is an axis."""
    if guidance is None or "history_guidance" not in config.sample:
        return config
    guided = config.copy_and_resolve_references()
    guided.sample.history_guidance = float(guidance)
    return guided


def base_config(args):
    """The recipe with the data, seeds and overrides applied (ptss.scheme and p are set per
    model)."""
    from fvdm_jax.config.load import load_config

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


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def train_model(config, workdir: str) -> None:
    """Trains (or finishes training) one model; a finished one is left alone."""
    from fvdm_jax.checkpoint.manager import TrainCheckpointer
    from fvdm_jax.training.loop import train

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
    """The real clips and statistics of one (frames, seed), shared by every run."""

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


def evaluate_model(config, workdir: str, run: Run, tasks, seeds, guidances, num_videos: int,
                   reals: RealSets, sheets_dir: str) -> list[dict]:
    """The FVD rows of one model, computing only those not stored yet. guidances: the history
    guidance scales of the zero-shot tasks."""
    from fvdm_jax.data import media
    from fvdm_jax.evaluation.features import task_features
    from fvdm_jax.evaluation.fvd import detector_batch_size, fvd_from_stats
    from fvdm_jax.sampling.sampler import VideoSampler
    from fvdm_jax.sampling.weights import load_sampling_params

    rows, samplers, weights = [], {}, None
    window = int(config.model.num_frames)
    for task, guidance, seed in evaluations(tasks, seeds, guidances):
        label = {"run": run.name, "scheme": run.scheme, "p": run.p, "history_guidance": guidance}
        if guidance:
            label["history_guidance_mode"] = config.sample.get("history_guidance_mode", "vanilla")
            label["history_noise_level"] = config.sample.get("history_noise_level")
        tag = guidance_tag(config, guidance)
        path = os.path.join(workdir, fvd_name(task, seed, tag))
        if os.path.isfile(path):
            stored = _read_json(path)
            for key, value in label.items():  # rows stored by earlier versions lack these keys
                stored.setdefault(key, value)
            rows.append(stored)
            continue
        sample_config = guided_config(config, guidance)
        hg_scale = float(sample_config.sample.get("history_guidance", 0.0) or 0.0)
        if hg_scale not in samplers:  # one sampler per scale: generate shares the unguided one
            if weights is None:
                weights = load_sampling_params(config, workdir)
            model_config, diffusion_config, params = weights
            samplers[hg_scale] = VideoSampler.from_config(sample_config, params, model_config=model_config,
                                                       diffusion_config=diffusion_config)
        sampler = samplers[hg_scale]
        frames = 2 * window if get_task(task).long else window
        task_config = sample_config.copy_and_resolve_references()
        if get_task(task).long:
            task_config.sample.total_frames = frames
        batch = detector_batch_size(int(config.eval.batch_size), frames, reals.detector.batch_divisor)
        real, real_stats = reals.get(frames, seed, num_videos)
        keep, clock = [], time.perf_counter()
        stats = task_features(task_config, sampler, reals.detector, batch, real, real_stats, task,
                              num_videos, frames, seed, keep=keep,
                              conditional=sampler.num_classes > 0)
        row = {**label, "task": task, "seed": seed, "fvd": fvd_from_stats(real_stats, stats),
               "num_generated": int(stats.count), "num_real": int(real_stats.count),
               "num_frames": frames, "steps": int(config.train.num_steps),
               "seconds": time.perf_counter() - clock, "detector": reals.detector.name}
        files.write_json(path, row)
        rows.append(row)
        if seed == seeds[0] and keep:
            videos = np.stack(keep)
            scale = media.sheet_scale(videos.shape[2], int(config.sample.sheet_frame_size))
            os.makedirs(sheets_dir, exist_ok=True)
            media.write_png(os.path.join(sheets_dir, f"{run.name}_{task}{tag}.png"),
                            media.frame_grid(videos, scale=scale))
        logging.info("%s %s%s seed %d: FVD %.1f", run.label, task,
                     f" (history guidance {guidance:g})" if guidance else "", seed, row["fvd"])
    return rows


def run(argv) -> dict:
    """The whole experiment; returns the summary written to OUT/results.json."""
    args = parse_args(argv)
    runs, tasks, seeds, guidance_flag = check_args(args)
    config = base_config(args)
    runs = resolve_runs(runs, config)
    has_key = "history_guidance" in config.sample
    if guidance_flag is not None and any(guidance_flag) and not has_key:
        raise ExperimentError(f"--history_guidance={args.history_guidance}: the config has no "
                              f"sample.history_guidance (its sampler has no history guidance); "
                              f"drop the flag or use a version whose configs/default.py has it")
    # Without the flag the zero-shot tasks run at the config's scale, and no guidance axis is shown.
    guidances = guidance_flag or [float(config.sample.get("history_guidance", 0.0) or 0.0)]
    described = check_data(config)
    import jax

    from fvdm_jax.config.checks import check
    from fvdm_jax.evaluation.fvd import detector_batch_size, load_detector
    from fvdm_jax.runtime import sharding as shd

    try:  # every model's recipe and every guidance scale's sampling, before anything trains
        for item in runs:
            check(run_config(config, item), "train", near=args.config)
        for guidance in guidances:
            check(guided_config(config, guidance), "sample", near=args.config)
    except ValueError as error:
        raise ExperimentError(str(error)) from None
    os.makedirs(args.out, exist_ok=True)
    logging.info("training timestep experiment: %s, tasks %s, eval seeds %s%s; data: %s",
                 ", ".join(r.label for r in runs), tasks, seeds,
                 f", history guidance {guidances}" if guidance_flag else "", described)
    started = time.perf_counter()
    mesh = shd.make_mesh(config.mesh)
    detector = load_detector(config.eval.detector, mesh, shd.rules_from_config(config.mesh))
    batch = detector_batch_size(int(config.eval.batch_size), int(config.model.num_frames),
                                detector.batch_divisor)
    resolution = int(config.model.input_size)
    reals = RealSets(config, detector, batch, os.path.join(args.out, "fvd_cache"), resolution)
    rows = []
    for item in runs:
        model_config = run_config(config, item)
        workdir = os.path.join(args.out, item.name)
        evaluated = all(os.path.isfile(os.path.join(workdir, fvd_name(t, s, guidance_tag(config, g))))
                        for t, g, s in evaluations(tasks, seeds, guidances))
        if not evaluated:  # a model whose FVDs are all stored needs no weights (nor training)
            train_model(model_config, workdir)
        rows += evaluate_model(model_config, workdir, item, tasks, seeds, guidances, args.num_videos,
                               reals, os.path.join(args.out, "sheets"))
    table = summarize(rows, runs, tasks, guidances)
    axis = guidance_flag is not None
    info = {"data": described, "config": args.config, "steps": int(config.train.num_steps),
            "seed": args.seed, "num_videos": args.num_videos, "num_seeds": len(seeds),
            "frames": int(config.model.num_frames), "runs": [r.label for r in runs],
            "history_guidance": guidances if axis else None}
    by_name = {r.name: r for r in runs}
    summary = {"info": info, "rows": rows, "command": " ".join(["python -m fvdm_jax.experiments.ptss"] + list(argv)),
               "seconds_this_run": time.perf_counter() - started,
               "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
               "table": [{"run": name, "scheme": by_name[name].scheme, "p": by_name[name].p,
                          "history_guidance": g, "task": t, "mean": m, "spread": s, "seeds": n}
                         for (name, t, g), (m, s, n) in table.items()]}
    if jax.process_index() == 0:
        files.write_json(os.path.join(args.out, "results.json"), summary)
        markdown = results_markdown(table, runs, tasks, info, guidances, guidance_axis=axis)
        files.write_text(os.path.join(args.out, "results.md"), markdown)
        results_plot(table, runs, tasks, os.path.join(args.out, "results.png"), guidances,
                     guidance_axis=axis)
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
