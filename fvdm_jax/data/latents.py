"""The latent cache: SD-VAE posterior moments of every frame of every video, in ArrayRecord shards.

The official pipeline re-encodes a fresh clip with the VAE at every step. The cache keeps that
randomness without the VAE: it stores, per video, the posterior MEAN and LOG-VARIANCE of every
frame (and of every mirrored frame when the dataset flips), and `LatentCacheSource` draws the
temporal window, the flip and the posterior sample at read time, for every example of every
epoch. Nothing is frozen per video.

Layout of a cache directory:
    cache.json                        what was encoded (dataset, sizes, VAE, counts, classes)
    latents-SSSSS.array_record        one record per video, shard S of every `videos_per_shard`

A record is an uncompressed .npz (no pickle): mean, logvar (T, h, w, c) [, mean_flip,
logvar_flip], label () int32, name () str.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fvdm_jax.data import clips
from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime.files import write_json

META_FILE = "cache.json"
SHARD_PATTERN = "latents-{:05d}.array_record"


def serialize_record(record: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in record.items()})
    return buffer.getvalue()


def deserialize_record(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def write_meta(cache_dir: str, meta: Mapping[str, Any]) -> None:
    path = os.path.join(cache_dir, META_FILE)
    write_json(path, dict(meta), indent=2)


def read_meta(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {cache_dir} is not a finished latent cache; build it with "
            f"`python -m fvdm_jax.main --mode=encode --config=... --workdir=...`"
        )
    with open(path) as f:
        return json.load(f)


def shard_paths(cache_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(cache_dir, "latents-*.array_record")))


class LatentCacheSource:
    """Random-access training source over a latent cache (data-source contract).

    `source[index]` reads video `index % len(source)` and draws, from
    np.random.default_rng((seed, index)), the dataset's temporal window and flip (clips.py rules)
    and the posterior sample; the pipeline passes indices that grow across epochs
    (`epoch_indexed`), so every epoch sees new clips. Returns {'video': float32 (F, h, w, c)
    latents times scale_factor, 'label': int32}.
    """

    epoch_indexed = True

    def __init__(
        self,
        cache_dir: str,
        *,
        num_frames: int,
        frame_interval: int,
        seed: int,
        sample_posterior: bool = True,
        dataset: str | None = None,
    ):
        self.cache_dir = os.path.abspath(cache_dir)
        self.meta = read_meta(self.cache_dir)
        self.paths = shard_paths(self.cache_dir)
        if not self.paths:
            raise FileNotFoundError(f"no latents-*.array_record shards in {self.cache_dir}")
        if dataset is not None and dataset != self.meta["dataset"]:
            raise ConfigError(
                f"data.dataset={dataset!r} but the cache in {self.cache_dir} holds "
                f"{self.meta['dataset']!r}; point data.path at the right cache"
            )
        self.dataset = self.meta["dataset"]
        self.num_frames = int(num_frames)
        self.frame_interval = int(frame_interval)
        self.seed = int(seed)
        self.sample_posterior = bool(sample_posterior)
        self.scale_factor = float(self.meta["scale_factor"])
        if clips.clip_rule(self.dataset).flip and not self.meta.get("flips", False):
            raise ConfigError(
                f"the {self.dataset} recipe flips clips but {self.cache_dir} has no mirrored "
                f"latents; re-encode it"
            )
        self._reader = None
        self._length = int(self.meta["num_records"])

    def _source(self):
        if self._reader is None:  # opened lazily, once per (worker) process
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource(self.paths)
            if len(self._reader) != self._length:
                raise ConfigError(
                    f"{self.cache_dir}: cache.json lists {self._length} videos but the shards "
                    f"hold {len(self._reader)}; the cache is incomplete, re-run the encode job"
                )
        return self._reader

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def __len__(self) -> int:
        return self._length

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))

    def record(self, video_index: int) -> dict[str, np.ndarray]:
        return deserialize_record(self._source()[int(video_index)])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        rng = np.random.default_rng((self.seed, index))
        record = self.record(index % self._length)
        total = record["mean"].shape[0]
        plan = clips.sample_clip(self.dataset, total, self.num_frames, self.frame_interval, rng)
        suffix = "_flip" if plan.flip else ""
        mean = record["mean" + suffix][plan.indices].astype(np.float32)
        if self.sample_posterior:
            logvar = record["logvar" + suffix][plan.indices].astype(np.float32)
            noise = rng.standard_normal(mean.shape, dtype=np.float32)
            mean = mean + np.exp(0.5 * logvar) * noise
        return {
            "video": (mean * self.scale_factor).astype(np.float32),
            "label": np.asarray(record["label"], np.int32),
        }
