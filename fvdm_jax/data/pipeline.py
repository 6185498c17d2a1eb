"""Sources from config, and per-host training batches that are a pure function of the step.

One global example stream: the source shuffled with `seed` (a fresh permutation each epoch) and
repeated forever. Global batch `s` is stream elements [s*B, (s+1)*B); host `pi` of `pc` reads the
contiguous slice [s*B + pi*B/pc, s*B + (pi+1)*B/pc). So:
- concatenating the hosts' batches in process order gives the same global batch for ANY process
  count (a run can move between slice shapes and still see the same data);
- the batch at step `s` needs no saved state: resuming at a step is just `start_step=s`.

All indexing is arithmetic on grain `MapDataset`s; elements are never read to skip them.

Checkpointing (grain 0.2.18): the returned iterator is a `grain.DatasetIterator` whose state is
`{'step': next global batch}`. Save and restore it with orbax through
`grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)` (defined in
`grain._src.python.checkpoint.handler`, registered with orbax when orbax is importable), e.g.
`ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it), ...)`. Each process writes
`process_{i}-of-{n}.json`, so orbax restore expects the same process count; for any other count
pass `start_step=restored_step` instead, which gives the same global batches.

numpy only below the iterator: elements are built and batched inside grain worker processes.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np
from absl import flags

from fvdm_jax.data.synthetic import SyntheticTextLatentSource, SyntheticVideoSource
from fvdm_jax.errors import ConfigError

SYNTHETIC_TEXT_LENGTH = 8  # data.text_length of synthetic text contexts when it is None


def _required(config: Mapping[str, Any], key: str, section: str) -> Any:
    """`config[key]`, or a one-line error naming the missing `section.key`."""
    value = config.get(key)
    if value is None:
        raise ConfigError(f"config {section}.{key} is not set; pass --config.{section}.{key}=...")
    return value


def _synthetic(data, model, vae, workdir, num_classes):
    if model.get("architecture") == "wan":
        return SyntheticTextLatentSource(
            num_examples=_required(data, "num_examples", "data"),
            num_frames=_required(model, "num_frames", "model"),
            latent_size=_required(model, "latent_size", "model.wan"),
            channels=_required(model, "in_channels", "model"),
            text_length=data.get("text_length") or SYNTHETIC_TEXT_LENGTH,
            text_dim=_required(model, "text_dim", "model.wan"),
            num_prompts=_required(data, "synthetic_prompts", "data"),
            seed=_required(data, "seed", "data"),
        )
    return SyntheticVideoSource(
        num_examples=_required(data, "num_examples", "data"),
        num_frames=_required(model, "num_frames", "model"),
        image_size=_required(model, "input_size", "model"),
        channels=_required(model, "in_channels", "model"),
        num_classes=num_classes,
        seed=_required(data, "seed", "data"),
    )


def _rgb(model, source: str) -> None:
    if model.get("in_channels") != 3:
        raise ConfigError(f"data.source='{source}' yields RGB pixels; set model.in_channels=3.")


def _demo(data, model, vae, workdir, num_classes):
    from fvdm_jax.data.demo import DemoClipSource, demo_options

    _rgb(model, "demo")
    built = DemoClipSource(
        num_examples=_required(data, "num_examples", "data"),
        num_frames=_required(model, "num_frames", "model"),
        image_size=_required(model, "input_size", "model"),
        frame_interval=_required(data, "frame_interval", "data"),
        seed=_required(data, "seed", "data"),
        label_by_clip=num_classes > 0,
        **demo_options(data),
    )
    if num_classes and built.num_classes != num_classes:
        raise ConfigError(
            f"a class-conditional demo model labels each clip: data.demo_clips has "
            f"{built.num_classes} clips but model.num_classes={num_classes}; set "
            f"model.num_classes={built.num_classes} (or 0: unconditional)"
        )
    return built


def _latents(data, model, vae, workdir, num_classes):
    from fvdm_jax.data.latents import LatentCacheSource

    cache = data.get("cache_path") or (workdir and os.path.join(workdir, "latents"))
    if not cache:
        raise ConfigError("data.source='latents' needs data.cache_path (or a workdir)")
    return LatentCacheSource(
        cache,
        num_frames=_required(model, "num_frames", "model"),
        frame_interval=_required(data, "frame_interval", "data"),
        seed=_required(data, "seed", "data"),
        sample_posterior=bool(_required(vae or {}, "sample_posterior", "vae")),
        dataset=data.get("dataset"),
    )


def _clip_rules(data, model, num_classes) -> dict:
    """The keyword arguments of the real-video sources (video folders, TFDS): the dataset's clip
    rules, the model's frame count, labels when the model is class-conditional."""
    return dict(
        dataset=_required(data, "dataset", "data"),
        num_frames=_required(model, "num_frames", "model"),
        frame_interval=_required(data, "frame_interval", "data"),
        image_size=_required(data, "image_size", "data"),
        seed=_required(data, "seed", "data"),
        labels=num_classes > 0,
        class_ids=data.get("class_ids") or "sorted",
    )


def _tfds(data, model, vae, workdir, num_classes):
    from fvdm_jax.data.tfds_source import TfdsVideoSource

    _rgb(model, "tfds")
    built = TfdsVideoSource(
        _required(data, "tfds_name", "data"),
        split=data.get("tfds_split") or data.get("split"),
        data_dir=data.get("tfds_data_dir"),
        video_key=data.get("tfds_video_key") or "video",
        label_key=data.get("tfds_label_key") or "label",
        **_clip_rules(data, model, num_classes),
    )
    logging.info("%s", built.describe())
    return built


def _video_folder(data, model, vae, workdir, num_classes):
    from fvdm_jax.data.folder import VideoFolderSource

    built = VideoFolderSource(_required(data, "path", "data"), split=data.get("split"),
                              **_clip_rules(data, model, num_classes))
    logging.info("%s", built.describe())
    return built


def _text_latents(data, model, vae, workdir, num_classes):
    """Per-clip VAE latents + text-encoder contexts (DiffSynth/Pusa .pth, or .npz) in data.path,
    cached in data.cache_path (default WORKDIR/text_latents); process 0 builds or refreshes the
    cache (a no-op when it is current) while the others wait for it."""
    from fvdm_jax.data import text_latents

    cache = data.get("cache_path") or (workdir and os.path.join(workdir, "text_latents"))
    if not cache:
        raise ConfigError("data.source='text_latents' needs data.cache_path (or a workdir)")
    if data.get("path"):
        import jax

        if jax.process_index() == 0:
            text_latents.build_text_latent_cache(
                data.get("path"), cache, text_length=data.get("text_length"),
                dtype=data.get("cache_dtype") or "float32",
                clips_per_shard=int(data.get("cache_videos_per_shard") or 64))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("fvdm_jax_text_latents_cache")
    built = text_latents.TextLatentSource(cache, num_frames=model.get("num_frames"),
                                          seed=_required(data, "seed", "data"))
    text_latents.check_model(built, model, num_classes)
    return built


# data.source -> builder(data, model, vae, workdir, num_classes); the names are data.SOURCES.
BUILDERS = {"synthetic": _synthetic, "video_folder": _video_folder, "latents": _latents,
            "demo": _demo, "tfds": _tfds, "text_latents": _text_latents}


def make_source(
    data_config: Mapping[str, Any],
    model_config: Mapping[str, Any],
    vae_config: Mapping[str, Any] | None = None,
    workdir: str | None = None,
):
    """The random-access source named by `data_config['source']` (one builder per name, BUILDERS).

    Args:
      data_config: the `data` config section (ml_collections ConfigDict or dict).
        'synthetic': num_examples, seed (with a Wan model: text_length, synthetic_prompts and
        the model's latent_size and text_dim; examples then hold 'context' too). 'demo':
        num_examples, frame_interval, seed (the shipped real clips, pixels). 'video_folder':
        path, dataset, split, frame_interval, image_size, seed (pixels in [-1, 1]). 'latents':
        cache_path (default WORKDIR/latents, where --mode=encode writes it), frame_interval,
        seed. 'tfds': tfds_name, tfds_data_dir,
        tfds_split (else split), tfds_video_key, tfds_label_key, dataset, class_ids,
        frame_interval, image_size, seed (pixels in [-1, 1], the clip rules of video_folder).
        'text_latents': path (the per-clip .pth / .npz files), cache_path (default
        WORKDIR/text_latents), text_length, cache_dtype, cache_videos_per_shard, seed; its
        examples also hold 'context' float32 (L, D) and 'context_mask' bool (L,).
      model_config: the `model` section; the source makes videos of the model's input shape:
        num_frames (F), input_size (H = W), in_channels (C), num_classes (0 = unconditional);
        'text_latents' checks in_channels, patch_size, input_size and text_dim when set.
      vae_config: the `vae` section ('latents' reads vae.sample_posterior).
      workdir: the run directory (the default location of the latent cache).

    Returns:
      A source with `__len__` and `__getitem__(i) -> {'video': float32 (F, H, W, C),
      'label': int32 ()}`.
    """
    source = data_config.get("source")
    if source not in BUILDERS:
        raise ConfigError(f"data.source={source!r} is not supported; use one of {', '.join(BUILDERS)}.")
    num_classes = int(model_config.get("num_classes") or 0)
    built = BUILDERS[source](data_config, model_config, vae_config, workdir, num_classes)
    if source in ("latents", "tfds", "video_folder") and built.num_classes != num_classes:
        origin = f"data.tfds_name={built.name!r}" if source == "tfds" else "data.path"
        raise ConfigError(
            f"{origin} has {built.num_classes} classes but model.num_classes={num_classes}; "
            f"set model.num_classes={built.num_classes}"
        )
    return built


class _HostSliceMapDataset(grain.MapDataset):
    """Element j of this host = global stream element for (step, offset) = divmod(j, B_local).

    Infinite: (first_step + j // B_local) * B + process_index * B_local + j % B_local, so batching
    it by B_local gives this host's contiguous part of global batches first_step, first_step+1, ...
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(
        self,
        stream: grain.MapDataset,
        *,
        global_batch_size: int,
        local_batch_size: int,
        process_index: int,
        first_step: int,
    ):
        super().__init__(stream)
        self._global_batch_size = global_batch_size
        self._local_batch_size = local_batch_size
        self._process_index = process_index
        self._first_step = first_step

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return (
            f"HostSliceMapDataset(global_batch_size={self._global_batch_size}, "
            f"process_index={self._process_index}, first_step={self._first_step})"
        )

    def _stream_index(self, index: int) -> int:
        step, offset = divmod(index, self._local_batch_size)
        return (
            (self._first_step + step) * self._global_batch_size
            + self._process_index * self._local_batch_size
            + offset
        )

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._stream_index(index)]


class _EpochIndexedRead:
    """Stream element i holding video v -> source[v + len * (i // len)].

    For sources with `epoch_indexed = True`, whose clip randomness is seeded by the index they
    receive: each epoch then draws new windows, flips, crops and posterior samples. A class, not a
    lambda, so that grain worker processes can pickle it.
    """

    def __init__(self, source):
        self._source = source
        self._length = len(source)

    def __call__(self, stream_index, video_index):
        return self._source[int(video_index) + self._length * (stream_index // self._length)]


def _global_stream(source, *, seed: int, shuffle: bool) -> grain.MapDataset:
    """The source, shuffled per epoch with `seed` when `shuffle`, repeated forever."""
    if getattr(source, "epoch_indexed", False):
        stream = grain.MapDataset.range(len(source))
        if shuffle:
            stream = stream.seed(seed).shuffle()  # the same per-epoch permutation as below
        return stream.repeat().map_with_index(_EpochIndexedRead(source))
    stream = grain.MapDataset.source(source)
    if shuffle:
        # repeat() after shuffle(): each epoch gets its own permutation derived from `seed`.
        stream = stream.seed(seed).shuffle()
    return stream.repeat()


def _host_batch_iter_dataset(
    first_step: int,
    *,
    source,
    global_batch_size: int,
    local_batch_size: int,
    seed: int,
    process_index: int,
    num_workers: int,
    shuffle: bool,
    read_threads: int,
    prefetch_batches: int,
) -> grain.IterDataset:
    """This host's batches from global batch `first_step` on, as an IterDataset."""
    host = _HostSliceMapDataset(
        _global_stream(source, seed=seed, shuffle=shuffle),
        global_batch_size=global_batch_size,
        local_batch_size=local_batch_size,
        process_index=process_index,
        first_step=first_step,
    )
    # Batch before mp_prefetch: workers slice the dataset by whole batches, which keeps the
    # output order (and so the batches) independent of num_workers.
    # grain's default ReadOptions buffer 500 elements, and our elements are whole video batches.
    read_options = grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=prefetch_batches
    )
    dataset = host.batch(local_batch_size, drop_remainder=True).to_iter_dataset(read_options)
    if num_workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return dataset


class HostBatchIterator(grain.DatasetIterator):
    """Iterator over this host's batches; its checkpoint state is the next global step.

    Yields `{'video': float32 (B_local, F, H, W, C), 'label': int32 (B_local,)}`. Because batches
    are a pure function of the step, `set_state({'step': s})` rebuilds the grain pipeline at `s`
    (whatever `start_step` this iterator was built with) instead of replaying worker states.
    The state holds only the step, so restoring it under another seed or global batch size
    gives that configuration's batch at that step.
    """

    def __init__(self, build: Callable[[int], grain.IterDataset], start_step: int):
        super().__init__()
        self._build = build
        self._step = start_step
        self._iterator = iter(build(start_step))

    @property
    def step(self) -> int:
        """The global batch number the next `next()` returns."""
        return self._step

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._iterator)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step}

    def set_state(self, state: dict[str, Any]) -> None:
        self._assert_not_closed()
        step = int(state["step"])
        if step < 0:
            raise ConfigError(f"iterator state step={step} must be >= 0.")
        if step == self._step:
            return
        # Stop the old pipeline's worker processes before starting new ones.
        self._iterator.close()
        self._iterator = iter(self._build(step))
        self._step = step

    def start_prefetch(self) -> None:
        self._assert_not_closed()
        self._iterator.start_prefetch()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # __del__ may run on a half-built object if __init__ raised.
        iterator = getattr(self, "_iterator", None)
        if iterator is not None:
            iterator.close()
            # Drop it now: grain's iterators close again in __del__, which fails noisily if that
            # only happens at interpreter shutdown.
            self._iterator = None

    def __str__(self) -> str:
        return f"HostBatchIterator(step={self._step})"


def host_batches(
    source,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int,
    process_index: int,
    process_count: int,
    num_workers: int = 0,
    shuffle: bool = True,
    read_threads: int = 4,
    prefetch_batches: int = 4,
) -> HostBatchIterator:
    """This host's part of global batches start_step, start_step + 1, ... forever.

    Args:
      source: random-access source (`len`, `[i]`) of `{'video': (F, H, W, C), 'label': ()}`;
        any further keys (text_latents: 'context', 'context_mask') are batched the same way.
      global_batch_size: B, examples per step over all hosts; divisible by process_count.
      seed: shuffle seed of the global example stream (the same on every host).
      start_step: the first global batch to yield (e.g. the restored train step).
      process_index, process_count: this host's `jax.process_index()` / `jax.process_count()`.
      num_workers: grain worker processes building batches; 0 builds them in this process.
      shuffle: False streams the source in order (epoch after epoch).
      read_threads: threads building batches in parallel in each process (0 = none).
      prefetch_batches: batches buffered ahead in each process (the main one, or each worker
        when num_workers > 0); bounds host memory at about that many batches per process.

    Returns:
      A grain `DatasetIterator` of `{'video': float32 (B/pc, F, H, W, C), 'label': int32
      (B/pc,)}`: rows [pi*B/pc, (pi+1)*B/pc) of each global batch. Its state ({'step': s}) works
      with `grain.checkpoint.CheckpointSave` / `CheckpointRestore`.
    """
    if global_batch_size <= 0 or process_count <= 0:
        raise ConfigError(
            f"global_batch_size={global_batch_size} and process_count={process_count} must be "
            "positive."
        )
    if global_batch_size % process_count:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}; use a multiple of {process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} is outside [0, {process_count}).")
    if start_step < 0:
        raise ConfigError(f"start_step={start_step} must be >= 0.")
    if min(num_workers, read_threads, prefetch_batches) < 0:
        raise ConfigError(
            f"num_workers={num_workers}, read_threads={read_threads} and "
            f"prefetch_batches={prefetch_batches} must be >= 0."
        )
    if num_workers > 0 and not flags.FLAGS.is_parsed():
        # grain's workers read absl flags; outside an absl app (tests, notebooks) nothing parsed
        # them, so accept their defaults. Inside main.py this is a no-op.
        flags.FLAGS.mark_as_parsed()
    build = functools.partial(
        _host_batch_iter_dataset,
        source=source,
        global_batch_size=global_batch_size,
        local_batch_size=global_batch_size // process_count,
        seed=seed,
        process_index=process_index,
        num_workers=num_workers,
        shuffle=shuffle,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
    )
    return HostBatchIterator(build, start_step)

