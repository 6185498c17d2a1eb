"""FVD during training: eval.train_num_videos generated videos of the EMA weights against as many
real clips, every eval.every_steps; the sampler compiles once, the real statistics and the I3D
weights are loaded once per process."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from typing import Any

import jax

from fvdm_jax.errors import ConfigError
from fvdm_jax.evaluation import features
from fvdm_jax.evaluation.features import protocol_from_config
from fvdm_jax.evaluation.fvd import FeatureStats, detector_batch_size, fvd_from_stats, load_detector
from fvdm_jax.evaluation.records import append_record
from fvdm_jax.evaluation.videos import open_real
from fvdm_jax.models.i3d import I3D_MIN_FRAMES
from fvdm_jax.runtime import metrics
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.sampling.sampler import VideoSampler

logger = logging.getLogger(__name__)

_TRAINING_REAL: dict[str, FeatureStats] = {}
_TRAINING_SAMPLERS: dict[Any, Any] = {}


def _training_sampler(config, mesh):
    """One VideoSampler per (config, mesh) and process: it compiles once; params come per call."""
    key = (config.to_json_best_effort(sort_keys=True), mesh)
    if key not in _TRAINING_SAMPLERS:
        _TRAINING_SAMPLERS[key] = VideoSampler.from_config(config, None, mesh=mesh)
    return _TRAINING_SAMPLERS[key]


def training_fvd(config, workdir: str, step: int, params, mesh) -> dict[str, float]:
    """FVD of eval.train_num_videos generated videos (the model's frames, task 'generate') against as
    many real clips, for training: {'fvd{N}_{F}f': value}. Real statistics are cached on disk and in
    memory, the I3D weights loaded once per process. params: the EMA parameters (may be sharded)."""
    ev = config.eval
    started = time.perf_counter()
    rules = shd.rules_from_config(config.mesh)
    detector = load_detector(ev.detector, mesh, rules)
    sampler = _training_sampler(config, mesh)
    num_frames, height = int(sampler.pixel_shape[0]), int(sampler.pixel_shape[1])
    if num_frames < I3D_MIN_FRAMES:
        raise ConfigError(f"FVD during training: the model makes {num_frames}-frame videos, I3D needs "
                         f">= {I3D_MIN_FRAMES}; set eval.every_steps=0")
    num = int(ev.train_num_videos)
    protocol = protocol_from_config(config, num_frames, int(ev.resolution or height), num_videos=num)
    batch = detector_batch_size(int(ev.batch_size), num_frames, detector.batch_divisor)
    memory_key = json.dumps([dataclasses.asdict(protocol), ev.real_path, ev.split, config.data.get("path"),
                             config.data.source, detector.name], sort_keys=True)
    real_stats = _TRAINING_REAL.get(memory_key)
    if real_stats is None:
        real = open_real(config, protocol)
        cache_dir = ev.cache_dir or os.path.join(workdir, "fvd_cache")
        real_stats, _ = features.real_statistics(real, protocol, detector, cache_dir, batch, int(ev.num_workers))
        _TRAINING_REAL[memory_key] = real_stats
    fake_stats = features.generated_features(sampler, num, num_frames, detector, batch, int(ev.seed),
                                    int(config.sample.batch_size), params=params)
    fvd = fvd_from_stats(real_stats, fake_stats)
    name = f"fvd{num}_{num_frames}f"
    if jax.process_index() == 0:
        try:  # the curve with this value, which the loop writes to metrics.jsonl after this returns
            metrics.plot_fvd(workdir, current={int(step): {name: fvd}})
        except Exception as error:  # noqa: BLE001 - a figure is not worth a crashed run
            logger.warning("plots/fvd.png failed (%s); training goes on", error)
    append_record(workdir, {"metric": name, "fvd": fvd, "step": int(step), "task": "generate",
                            "num_generated": num, "num_real": int(real_stats.count), "training": True,
                            "detector": detector.name, "seconds": time.perf_counter() - started,
                            "time": datetime.datetime.now().isoformat(timespec="seconds"),
                            **dataclasses.asdict(protocol)})
    return {name: fvd}
