"""What a finished training run shows a person: the plots, the FVD verdict and the summary.

`finish_training(config, workdir)` runs after `--mode=train` completes:
- WORKDIR/plots/loss.png: loss, mse and vb against the step (log scale), from metrics.jsonl (also
  written at every checkpoint; WORKDIR/plots/fvd.png when FVD ran during training).
- With `eval.after_training` naming tasks (the demo: generate, i2v, interpolate), the verdict:
  FVD of `eval.num_videos` videos per task against as many real clips (for the demo source with
  `data.hold_out_frames`, clips of frames it never trained on), next to baselines computed the same
  way against the same real statistics (`eval.baselines`):
    noise     uniform noise videos (what FVD gives for no video at all),
    shuffled  other real clips of the same set with their frames in random order (right
              frames, no motion: a model below it makes temporally coherent video),
    real      other real clips in order (the floor that this many videos allow).
  The table is printed and logged, every row is one line of WORKDIR/eval.jsonl ('verdict': true),
  and WORKDIR/verdict/<task>.png shows the first `sample.train_num_videos` evaluated videos of each
  task, enlarged, each under the real clip it was conditioned on.
- The summary (`summary_rows`, printed after every training run, also a preempted one): the final
  loss and where the checkpoints, exports, samples, verdict, plots, metrics and TensorBoard
  events are, with the `tensorboard --logdir` command.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from fvdm_jax import console, files, media, metrics
from fvdm_jax import sharding as shd
from fvdm_jax.errors import ConfigError
from fvdm_jax.evaluation.features import BASELINES, VERDICT_TASKS
from fvdm_jax.jobs import evaluate
from fvdm_jax.metrics import LOSS_PLOT, read_rows  # noqa: F401 - LOSS_PLOT: where the curve is

VERDICT_DIR = "verdict"


def validate_verdict_config(eval_config) -> None:
    """One-line errors for eval.after_training / eval.baselines."""
    tasks = tuple(eval_config.get("after_training") or ())
    unknown = [t for t in tasks if t not in VERDICT_TASKS]
    if unknown:
        raise ConfigError(f"eval.after_training has unknown task(s) {unknown}; use some of "
                         f"{', '.join(VERDICT_TASKS)}")
    unknown = [b for b in tuple(eval_config.get("baselines") or ()) if b not in BASELINES]
    if unknown:
        raise ConfigError(f"eval.baselines has unknown baseline(s) {unknown}; use some of "
                         f"{', '.join(BASELINES)}")


# ---------------------------------------------------------------------------------------------
# The loss curve.


def read_metrics(workdir: str) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl, one per step (see fvdm_jax.metrics.read_rows)."""
    return read_rows(workdir)


def plot_loss(workdir: str, path: str | None = None) -> str | None:
    """The loss curve at `path` (WORKDIR/plots/loss.png); see fvdm_jax.metrics.plot_loss."""
    return metrics.plot_loss(workdir, path)


# ---------------------------------------------------------------------------------------------
# Baseline video sets: uint8 (N, F, H, W, 3).


def noise_videos(count: int, shape, seed: int) -> np.ndarray:
    """Uniform noise videos: every pixel of every frame independent, uniform in [0, 255]."""
    return np.random.default_rng((seed, 17)).integers(0, 256, (count, *shape), dtype=np.uint8)


def shuffle_frames(videos: np.ndarray, seed: int) -> np.ndarray:
    """The same videos with the frames of each in a random order (a fresh permutation per video)."""
    rng = np.random.default_rng((seed, 23))
    return np.stack([video[rng.permutation(len(video))] for video in videos])


def read_videos(video_set, count: int) -> np.ndarray:
    """The first `count` uint8 clips of a real video set (its `read(i) -> (video, label)`)."""
    return np.stack([video_set.read(i)[0] for i in range(min(count, len(video_set)))])


# ---------------------------------------------------------------------------------------------
# The verdict.


def format_table(rows: list[dict]) -> str:
    """The verdict's table: one line per task, then one per baseline."""
    first = rows[0] if rows else {}
    head = (f"FVD ({first.get('num_generated', '?')} videos per row vs {first.get('num_real', '?')} "
            f"real clips, {first.get('num_frames', '?')} frames, {first.get('detector', 'I3D')})")
    lines = [head, f"  {'row':<28} {'FVD':>10}"]
    for row in rows:
        name = row["task"] if not row.get("baseline") else f"baseline: {row['baseline_name']}"
        lines.append(f"  {name:<28} {row['fvd']:>10.1f}")
    return "\n".join(lines)


def verdict(config, workdir: str) -> list[dict]:
    """FVD per task of eval.after_training and per baseline of eval.baselines (see the module
    docstring); returns the rows, also appended to WORKDIR/eval.jsonl."""
    from fvdm_jax.evaluation.features import protocol_from_config, real_statistics, task_features
    from fvdm_jax.evaluation.fvd import batch_features, detector_batch_size, fvd_from_stats, load_detector
    from fvdm_jax.evaluation.videos import open_real
    from fvdm_jax.models.i3d import I3D_MIN_FRAMES
    from fvdm_jax.sampling.sampler import VideoSampler
    from fvdm_jax.sampling.weights import load_sampling_params

    ev = config.eval
    validate_verdict_config(ev)
    evaluate.validate_eval_config(ev)
    tasks = tuple(ev.after_training)
    started = time.perf_counter()
    mesh = shd.make_mesh(config.mesh)
    model_config, diffusion_config, params = load_sampling_params(config, workdir)
    sampler = VideoSampler.from_config(config, params, mesh=mesh, model_config=model_config,
                                       diffusion_config=diffusion_config)
    num_frames, height = int(sampler.pixel_shape[0]), int(sampler.pixel_shape[1])
    if num_frames < I3D_MIN_FRAMES:
        raise ConfigError(f"the verdict's FVD needs >= {I3D_MIN_FRAMES} frames; the model makes "
                         f"{num_frames}: set eval.after_training=() or model.num_frames")
    num_videos = int(ev.num_videos)
    protocol = protocol_from_config(config, num_frames, int(ev.resolution or height))
    detector = load_detector(ev.detector, mesh, shd.rules_from_config(config.mesh))
    batch = detector_batch_size(int(ev.batch_size), num_frames, detector.batch_divisor)
    conditional = sampler.num_classes > 0  # zero-shot tasks take the real clips' classes
    real = open_real(config, protocol, labels=conditional)
    cache_dir = ev.cache_dir or os.path.join(workdir, "fvd_cache")
    real_stats, _ = real_statistics(real, protocol, detector, cache_dir, batch,
                                             int(ev.num_workers))
    step = evaluate.latest_checkpoint_step(workdir)
    common = {"step": step, "num_real": int(real_stats.count), "num_frames": num_frames,
              "detector": detector.name, "real": real.describe(), "verdict": True}
    rows, sheets = [], {}
    for task in tasks:
        clock, keep = time.perf_counter(), []
        stats = task_features(config, sampler, detector, batch, real, real_stats, task,
                              num_videos, num_frames, int(ev.seed), keep=keep,
                              conditional=conditional)
        sheets[task] = np.stack(keep)
        rows.append({"task": task, "fvd": fvd_from_stats(real_stats, stats),
                     "num_generated": int(stats.count), "seconds": time.perf_counter() - clock,
                     **common})
    baselines = tuple(ev.get("baselines") or ())
    if "shuffled" in baselines or "real" in baselines:
        # Other draws of the same real set (another seed: other windows, crops and flips).
        other_protocol = protocol_from_config(config, num_frames, protocol.resolution)
        other_protocol = type(other_protocol)(**{**other_protocol.__dict__, "seed": protocol.seed + 1})
        others = read_videos(open_real(config, other_protocol), num_videos)
    for name in baselines:
        clock = time.perf_counter()
        if name == "noise":
            videos = noise_videos(num_videos, (num_frames, protocol.resolution, protocol.resolution, 3),
                                  int(ev.seed))
        elif name == "shuffled":
            videos = shuffle_frames(others, int(ev.seed))
        else:
            videos = others
        stats = batch_features(detector, videos, batch)
        rows.append({"task": "baseline", "baseline": True, "baseline_name": name,
                     "fvd": fvd_from_stats(real_stats, stats), "num_generated": int(stats.count),
                     "seconds": time.perf_counter() - clock, **common})
    for row in rows:
        evaluate.append_record(workdir, row)
    _write_sheets(workdir, sheets, real, config)
    table = format_table(rows)
    if jax.process_index() == 0:
        print(table, flush=True)
        print(f"verdict sheets: {os.path.join(workdir, VERDICT_DIR)}/<task>.png; samples (GIF, MP4, "
              f"contact sheets): {os.path.join(workdir, 'samples')}; FVD rows: "
              f"{os.path.join(workdir, evaluate.EVAL_FILE)} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    return rows


def _write_sheets(workdir: str, sheets: dict, real, config) -> None:
    """WORKDIR/verdict/<task>.png: the first evaluated videos; zero-shot tasks under their real
    clips (the conditioning frames come from those)."""
    if jax.process_index() != 0 or not sheets:
        return
    directory = files.join(workdir, VERDICT_DIR)
    files.makedirs(directory)
    size = int(config.sample.get("sheet_frame_size", 1))
    for task, videos in sheets.items():
        if task != "generate":
            reals = read_videos(real, len(videos))
            videos = np.stack([v for pair in zip(reals, videos) for v in pair])
        scale = media.sheet_scale(videos.shape[2], size)
        media.write_png(files.join(directory, f"{task}.png"), media.frame_grid(videos, scale=scale))


# ---------------------------------------------------------------------------------------------
# The summary.


def _g4(value: float) -> str:
    return f"{value:.4g}"


def _listing(workdir: str, folder: str) -> list[str]:
    path = files.join(workdir, folder) if folder else workdir
    try:
        return files.listdir(path) if files.isdir(path) else []
    except OSError:
        return []


def summary_rows(workdir: str, *, steps: int, seconds: float | None, compilations: int) -> list[tuple[str, str]]:
    """The end of a training run (printed by fvdm_jax.console.summary): the final loss, and
    where the checkpoints, exports, samples, verdict, plots, metrics and TensorBoard events are
    (what `workdir` holds now)."""
    rows = [r for r in metrics.read_rows(workdir) if "loss" in r]
    out = []
    if rows:
        last = rows[-1]
        terms = ", ".join(f"{k} {_g4(last[k])}" for k in ("mse", "vb") if k in last)
        out.append(("final loss", f"{_g4(last['loss'])}" + (f" ({terms})" if terms else "")
                    + f" at step {last['step']}"))
    timing = f"at step {steps}" + (f" after {console.duration(seconds)} (this run)" if seconds is not None else "")
    out.append(("run", f"{timing}; the train step compiled {compilations} time(s)"))
    saved = sorted(int(n) for n in _listing(workdir, "checkpoints") if n.isdigit())
    if saved:
        out.append(("checkpoints", f"{files.join(workdir, 'checkpoints')} (steps "
                    f"{', '.join(map(str, saved))})"))
    exports = _listing(workdir, "export")
    out.append(("exports", f"{files.join(workdir, 'export')} ({', '.join(exports)})" if exports
                else "none yet: --mode=export writes the EMA weights to WORKDIR/export/step_N"))
    if _listing(workdir, "samples"):
        out.append(("samples", files.join(workdir, "samples")))
    if _listing(workdir, "verdict"):
        out.append(("verdict", f"{files.join(workdir, 'verdict')}/<task>.png, "
                    f"{files.join(workdir, 'eval.jsonl')}"))
    plots = [name for name in _listing(workdir, metrics.PLOTS_DIR) if name.endswith(".png")]
    if plots:
        out.append(("loss curve" if "loss.png" in plots else "plots",
                    ", ".join(files.join(workdir, metrics.PLOTS_DIR, name) for name in plots)))
    out.append(("metrics", files.join(workdir, metrics.METRICS_FILE)))
    events = any(n.startswith("events.out.tfevents") for n in _listing(workdir, ""))
    if events:
        out.append(("tensorboard", f"tensorboard --logdir {workdir}"))
    else:
        out.append(("tensorboard", "no events (clu / tensorflow not installed): metrics.jsonl only"))
    return out


def finish_training(config, workdir: str) -> None:
    """After a completed training run: the plots (WORKDIR/plots/), then the verdict if
    eval.after_training. The run's summary (fvdm_jax/console.py) names where everything is."""
    metrics.write_plots(workdir)
    if tuple(config.eval.get("after_training") or ()):
        verdict(config, workdir)
