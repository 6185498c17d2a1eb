"""`--mode=encode`: a video dataset -> a latent cache (see fvdm_jax/data/latents.py).

Every frame of every video goes through the dataset's spatial preprocessing (resize / crop, and
its mirror image when the dataset flips) and the SD VAE encoder; the per-frame posterior mean and
log-variance are written, one record per video. Shards of `data.cache_videos_per_shard` videos
are divided among hosts; each host encodes its frames in fixed-size batches split over its local
devices. A shard is written to a temporary file and renamed when complete, so an interrupted job
resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fvdm_jax.data import clips, latents
from fvdm_jax.data.folder import VideoFolderSource
from fvdm_jax.data.video import VideoReadError, iter_frames
from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime import files


def cache_dir(config, workdir: str) -> str:
    return config.data.get("cache_path") or os.path.join(workdir, "latents")


class FrameEncoder:
    """Encodes uint8-derived float frames (N, S, S, 3) in fixed batches over the local devices."""

    def __init__(self, vae_config: Mapping[str, Any]):
        from fvdm_jax.convert.diffusers_vae import load_diffusers_vae
        from fvdm_jax.models.vae import AutoencoderKL

        folder = vae_config.get("checkpoint")
        if not folder:
            raise ConfigError(
                "vae.checkpoint is not set: point it at a diffusers AutoencoderKL folder "
                "(config.json + diffusion_pytorch_model.safetensors), e.g. sd-vae-ft-ema"
            )
        from fvdm_jax.models.dit import DTYPES

        self.vae, params = load_diffusers_vae(folder, dtype=DTYPES[vae_config.get("dtype", "float32")])
        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("batch",))
        per_device = int(vae_config["encode_batch_size"])
        self.batch = per_device * len(devices)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.device_put(params, replicated)
        self._sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
        self.traces = 0  # how many times the encoder was traced: 1 for a whole job

        def encode(p, x):
            self.traces += 1  # runs only while tracing
            return self.vae.apply(p, x, method=AutoencoderKL.encode)

        self._encode = jax.jit(encode, in_shardings=(replicated, self._sharding))

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, 3) in [-1, 1] -> (mean, logvar), each (N, S/8, S/8, C) float32."""
        means, logvars = [], []
        for start in range(0, len(frames), self.batch):
            chunk = frames[start : start + self.batch]
            valid = len(chunk)
            if valid < self.batch:  # pad to one fixed shape: one compilation
                pad = np.zeros((self.batch - valid,) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            mean, logvar = self._encode(self.params, jax.device_put(chunk, self._sharding))
            means.append(np.asarray(mean)[:valid])
            logvars.append(np.asarray(logvar)[:valid])
        return np.concatenate(means), np.concatenate(logvars)


def encode_video(path: str, dataset: str, image_size: int, encoder, frames_per_read: int) -> dict:
    """All frames of one video -> {'mean', 'logvar'[, 'mean_flip', 'logvar_flip']}."""
    flips = clips.clip_rule(dataset).flip
    parts: dict[str, list[np.ndarray]] = {"mean": [], "logvar": [], "mean_flip": [], "logvar_flip": []}
    buffer = []

    def flush():
        frames = np.stack(buffer)
        for suffix, flip in (("", False), ("_flip", True)) if flips else (("", False),):
            pixels = clips.augment_frames(frames, dataset, image_size, flip)
            mean, logvar = encoder(pixels)
            parts["mean" + suffix].append(mean)
            parts["logvar" + suffix].append(logvar)
        buffer.clear()

    for frame in iter_frames(path):
        buffer.append(frame)
        if len(buffer) == frames_per_read:
            flush()
    if buffer:
        flush()
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def encode_dataset(config, workdir: str, encoder=None) -> str:
    """Encodes config.data's video folder into WORKDIR/latents (or data.cache_path); resumable."""
    from array_record.python.array_record_module import ArrayRecordWriter

    data, vae_cfg = config.data, config.vae
    if not data.get("path"):
        raise ConfigError("data.path is not set: point it at the video folder to encode")
    num_classes = int(config.model.get("num_classes") or 0)
    source = VideoFolderSource(
        data.path,
        dataset=data.dataset,
        num_frames=int(config.model.num_frames),
        frame_interval=int(data.frame_interval),
        image_size=int(data.image_size),
        split=data.get("split"),
        labels=num_classes > 0,
        class_ids=data.get("class_ids") or "sorted",
    )
    out = cache_dir(config, workdir)
    os.makedirs(out, exist_ok=True)
    encoder = encoder or FrameEncoder(vae_cfg)
    entries = source.entries
    per_shard = int(data.cache_videos_per_shard)
    shards = range((len(entries) + per_shard - 1) // per_shard)
    mine = [s for s in shards if s % jax.process_count() == jax.process_index()]
    bar = files.progress(len(entries), "encoding", leave=True)
    frames_done = 0
    for shard in mine:
        final = os.path.join(out, latents.SHARD_PATTERN.format(shard))
        members = entries[shard * per_shard : (shard + 1) * per_shard]
        if os.path.exists(final):  # finished by an earlier run
            if bar is not None:
                bar.update(len(members))
            continue
        tmp = final + ".tmp"
        writer = ArrayRecordWriter(tmp, "group_size:1")
        for entry in members:
            try:
                record = encode_video(
                    entry.path, data.dataset, int(data.image_size), encoder, encoder.batch
                )
            except VideoReadError as e:  # corrupt past its header: skip it, never stop the job
                logging.warning("skipping unreadable video %s: %s", entry.path, e)
                continue
            record.update(label=np.int32(entry.label), name=np.str_(entry.relative_path))
            writer.write(latents.serialize_record(record))
            frames_done += record["mean"].shape[0]
            if bar is not None:
                bar.update(1)
        writer.close()
        os.replace(tmp, final)
    if bar is not None:
        bar.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fvdm_jax_encode_done")
    if jax.process_index() == 0:
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        num_records = len(ArrayRecordDataSource(latents.shard_paths(out)))
        latents.write_meta(
            out,
            {
                "dataset": data.dataset,
                "image_size": int(data.image_size),
                "flips": clips.clip_rule(data.dataset).flip,
                "num_records": num_records,
                "num_classes": source.num_classes,
                "class_names": list(source.class_names or []),
                "scale_factor": float(vae_cfg.get("scale_factor") or encoder.vae.scaling_factor),
                "vae_checkpoint": str(vae_cfg.get("checkpoint")),
                "source_path": os.path.abspath(data.path),
                "skipped_videos": len(source.skipped),
            },
        )
    logging.info("encoded %d frames into %s", frames_done, out)
    return out
