"""The verdict after training: FVD per task of eval.after_training next to baselines.

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
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from fvdm_jax.data import media
from fvdm_jax.errors import ConfigError
from fvdm_jax.evaluation.features import protocol_from_config, real_statistics, task_features
from fvdm_jax.evaluation.fvd import batch_features, detector_batch_size, fvd_from_stats, load_detector
from fvdm_jax.evaluation.records import EVAL_FILE, append_record, latest_checkpoint_step
from fvdm_jax.evaluation.videos import open_real
from fvdm_jax.models.i3d import I3D_MIN_FRAMES
from fvdm_jax.runtime import files
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.sampling.sampler import VideoSampler
from fvdm_jax.sampling.weights import load_sampling_params

VERDICT_DIR = "verdict"
# Streams of the baselines' random draws, apart from every other use of eval.seed.
NOISE_SALT, SHUFFLE_SALT = 17, 23


# ---------------------------------------------------------------------------------------------
# Baseline video sets: uint8 (N, F, H, W, 3).


def noise_videos(count: int, shape, seed: int) -> np.ndarray:
    """Uniform noise videos: every pixel of every frame independent, uniform in [0, 255]."""
    return np.random.default_rng((seed, NOISE_SALT)).integers(0, 256, (count, *shape), dtype=np.uint8)


def shuffle_frames(videos: np.ndarray, seed: int) -> np.ndarray:
    """The same videos with the frames of each in a random order (a fresh permutation per video)."""
    rng = np.random.default_rng((seed, SHUFFLE_SALT))
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

    ev = config.eval
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
    step = latest_checkpoint_step(workdir)
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
        append_record(workdir, row)
    _write_sheets(workdir, sheets, real, config)
    table = format_table(rows)
    if jax.process_index() == 0:
        print(table, flush=True)
        print(f"verdict sheets: {os.path.join(workdir, VERDICT_DIR)}/<task>.png; samples (GIF, MP4, "
              f"contact sheets): {os.path.join(workdir, 'samples')}; FVD rows: "
              f"{os.path.join(workdir, EVAL_FILE)} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    return rows


def _write_sheets(workdir: str, sheets: dict, real, config) -> None:
    """WORKDIR/verdict/<task>.png: the first evaluated videos; zero-shot tasks under their real
    clips (the conditioning frames come from those)."""
    if jax.process_index() != 0 or not sheets:
        return
    directory = files.join(workdir, VERDICT_DIR)
    files.makedirs(directory)
    size = int(config.sample.sheet_frame_size)
    for task, videos in sheets.items():
        if task != "generate":
            reals = read_videos(real, len(videos))
            videos = np.stack([v for pair in zip(reals, videos) for v in pair])
        scale = media.sheet_scale(videos.shape[2], size)
        media.write_png(files.join(directory, f"{task}.png"), media.frame_grid(videos, scale=scale))
