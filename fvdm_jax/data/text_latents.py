"""Text-to-video training data: precomputed VAE latents + text-encoder output per clip, cached in
ArrayRecord shards (the data of Wan 2.1 / Pusa fine-tuning).

Input: a folder of per-clip files, read sorted and recursively.
- `*.pth` (`torch.save`, the layout DiffSynth-Studio's and Pusa's `data_process` step writes as
  `<video>.tensors.pth`): {'latents': (C, F, h, w) or (1, C, F, h, w), 'prompt_emb': {'context':
  (1, L, D) or (L, D)}, 'image_emb': ... (ignored)}; bfloat16 tensors are read exactly.
- `*.npz`: arrays 'latents' and 'context' of the same shapes, optionally 'context_length' ().
DiffSynth zeroes the text-encoder output after the prompt's last token (and pads it to 512), so
the real token count of a context is the index after its last non-zero row, unless a
'context_length' is stored.

Layout of a cache directory:
    cache.json                              what was read (sources, shapes, dtype, text_length)
    text-latents-SSSSS.array_record         `clips_per_shard` clips per shard

A record is an uncompressed .npz (no pickle): latents (F, h, w, C) channels-last, context
(n, D) with only the n = context_length real tokens, context_length () int32, name () str.
bfloat16 is stored as its uint16 bits. `TextLatentSource` pads (or truncates) the context to
`text_length` with zeros at read time, as Wan pads its prompts to 512 tokens, and rebuilds the
(text_length,) mask of the real tokens.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fvdm_jax.data.latents import deserialize_record, serialize_record
from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime.files import is_url, write_json

META_FILE = "cache.json"
SHARD_PATTERN = "text-latents-{:05d}.array_record"
FORMAT = "fvdm_text_latents/1"
EXTENSIONS = (".pth", ".npz")
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def _fail(file: str, problem: str, fix: str = "re-create it or move it out of the folder") -> None:
    raise ConfigError(f"{file}: {problem}; {fix}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def clip_files(path: str) -> list[str]:
    """Every *.pth / *.npz under `path`, recursively, as sorted paths relative to it."""
    if is_url(path):
        raise ConfigError(f"data.path={path}: text_latents reads a local folder; copy the clips there")
    if not os.path.isdir(path):
        raise ConfigError(f"data.path={path} is not a folder of per-clip .pth / .npz files")
    found = []
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        for name in names:
            if name.endswith(EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), path))
    if not found:
        raise ConfigError(f"data.path={path} holds no *.pth or *.npz clip files")
    return sorted(found)


def _to_numpy(value, file: str, key: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: bfloat16 has no numpy type, float32 is exact
        import torch

        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(torch.float32)
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    _fail(file, f"'{key}' is a {type(value).__name__}, not a tensor / array")


def _load_pth(file: str) -> tuple[Any, Any, Any]:
    try:
        import torch
    except ImportError:
        _fail(file, "reading .pth clips needs torch", "pip install torch, or save the clips as .npz")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, not a torch file, unsafe pickle
        _fail(file, f"not a readable torch file ({_first_line(e)})")
    if not isinstance(data, Mapping):
        _fail(file, f"holds a {type(data).__name__}, not the dict {{'latents', 'prompt_emb'}} of "
                    f"DiffSynth/Pusa")
    missing = [k for k in ("latents", "prompt_emb") if k not in data]
    if missing:
        _fail(file, f"no {missing} in the saved dict (keys: {sorted(map(str, data))})",
              "a clip file holds {'latents', 'prompt_emb': {'context'}}: re-run the data_process "
              "step for this clip or move it out of the folder")
    prompt = data["prompt_emb"]
    if not isinstance(prompt, Mapping) or "context" not in prompt:
        keys = sorted(map(str, prompt)) if isinstance(prompt, Mapping) else type(prompt).__name__
        _fail(file, f"'prompt_emb' has no 'context' ({keys})",
              "re-run the data_process step for this clip or move it out of the folder")
    return data["latents"], prompt["context"], None


def _load_npz(file: str) -> tuple[Any, Any, Any]:
    try:
        with np.load(file, allow_pickle=False) as npz:
            missing = [k for k in ("latents", "context") if k not in npz.files]
            if missing:
                _fail(file, f"no {missing} array (has {sorted(npz.files)})",
                      "an .npz clip holds 'latents' (C, F, h, w) and 'context' (L, D)")
            length = npz["context_length"] if "context_length" in npz.files else None
            return npz["latents"], npz["context"], length
    except ConfigError:
        raise
    except Exception as e:  # not a zip, truncated, object arrays
        _fail(file, f"not a readable .npz ({_first_line(e)})")


def read_clip(file: str) -> tuple[np.ndarray, np.ndarray, int]:
    """One clip file -> latents (F, h, w, C) float32, context (n, D) float32 with its n real
    tokens (n >= 1 unless the context is all zeros), n. ConfigError (one line) if unusable."""
    latents, context, length = (_load_pth if file.endswith(".pth") else _load_npz)(file)
    latents = _to_numpy(latents, file, "latents")
    context = _to_numpy(context, file, "context")
    if latents.ndim == 5 and latents.shape[0] == 1:
        latents = latents[0]
    if latents.ndim != 4:
        _fail(file, f"latents have shape {latents.shape}; expected (C, F, h, w) or (1, C, F, h, w)")
    if context.ndim == 3 and context.shape[0] == 1:
        context = context[0]
    if context.ndim != 2:
        _fail(file, f"context has shape {context.shape}; expected (L, D) or (1, L, D)")
    for key, value in (("latents", latents), ("context", context)):
        if not np.issubdtype(value.dtype, np.floating):
            _fail(file, f"{key} have dtype {value.dtype}, not floating point")
        if not np.isfinite(value).all():
            _fail(file, f"{key} hold NaN or inf values")
    latents = np.ascontiguousarray(np.transpose(latents, (1, 2, 3, 0)), np.float32)
    if length is None:
        nonzero = np.flatnonzero(np.any(context != 0, axis=1))
        length = int(nonzero[-1]) + 1 if len(nonzero) else 0
    else:
        length = int(length)
        if not 0 <= length <= context.shape[0]:
            _fail(file, f"context_length={length} is outside [0, {context.shape[0]}]")
    return latents, np.asarray(context[:length], np.float32), length


def _encode(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16).view(np.uint16)
    return array.astype(dtype)


def _decode(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return array.view(ml_dtypes.bfloat16).astype(np.float32)
    return array.astype(np.float32)


def read_meta(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, META_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: {cache_dir} is not a finished text-latent cache; set "
                          f"data.path to the folder of clip files to build it")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a text-latent cache ({FORMAT}); point data.cache_path "
                          f"at another folder")
    return meta


def _fingerprint(path: str, names: list[str]) -> list[list]:
    stats = [os.stat(os.path.join(path, name)) for name in names]
    return [[name, s.st_size, s.st_mtime_ns] for name, s in zip(names, stats)]


def _current(cache_dir: str, source_path: str, fingerprint, dtype: str) -> dict | None:
    """The cache's meta if it was built from exactly these files with this dtype, else None.
    ConfigError if cache_dir holds something else than a text-latent cache (never overwritten)."""
    path = os.path.join(cache_dir, META_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path} is unreadable ({_first_line(e)}); delete it to rebuild the "
                          f"cache") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{cache_dir} holds another cache ({path} is not {FORMAT}); point "
                          f"data.cache_path at another folder")
    shards = [os.path.join(cache_dir, name) for name in meta.get("shards", [])]
    same = [[c["file"], c["size"], c["mtime_ns"]] for c in meta.get("clips", [])] == fingerprint
    same = same and meta.get("source_path") == source_path
    if same and meta.get("dtype") == dtype and all(os.path.isfile(s) for s in shards):
        return meta
    return None


def build_text_latent_cache(path: str, cache_dir: str, *, text_length: int | None = None,
                            dtype: str = "float32", clips_per_shard: int = 64) -> dict:
    """Every clip file under `path` -> ArrayRecord shards + cache.json in `cache_dir`; returns
    the meta. A no-op (nothing written) when the cache was built from the same files (names,
    sizes, mtimes) with the same dtype; a new `text_length` only rewrites cache.json.

    text_length: tokens of every context (zero-padded / truncated); None = the longest real
    context of the set. dtype: storage of latents and context (float32 / float16 / bfloat16).
    """
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"text-latent cache dtype={dtype!r} is not one of {STORAGE_DTYPES}")
    if text_length is not None and int(text_length) <= 0:
        raise ConfigError(f"text_length={text_length} must be positive (Wan: 512)")
    if clips_per_shard <= 0:
        raise ConfigError(f"clips_per_shard={clips_per_shard} must be positive")
    path, cache_dir = os.path.abspath(path), os.path.abspath(cache_dir)
    names = clip_files(path)
    fingerprint = _fingerprint(path, names)
    meta = _current(cache_dir, path, fingerprint, dtype)
    if meta is not None:
        if text_length is None or int(text_length) == meta["text_length"]:
            return meta
        meta = _finish(cache_dir, dict(meta), int(text_length))
        write_json(os.path.join(cache_dir, META_FILE), meta, indent=1)
        return meta
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(cache_dir, exist_ok=True)
    meta_path = os.path.join(cache_dir, META_FILE)
    if os.path.exists(meta_path):  # a reader never sees the old meta with new shards
        os.remove(meta_path)
    clips, shards, writer, first = [], [], None, None
    try:
        for i, (name, size, mtime) in enumerate(fingerprint):
            file = os.path.join(path, name)
            latents, context, length = read_clip(file)
            shape = {"channels": latents.shape[3], "height": latents.shape[1],
                     "width": latents.shape[2], "context_dim": context.shape[1]}
            if first is None:
                first = (name, shape)
            elif shape != first[1]:
                _fail(file, f"latents / context shape {shape} differs from {first[0]}'s {first[1]}",
                      "every clip of a cache needs the same channels, latent size and text width")
            if i % clips_per_shard == 0:
                if writer is not None:
                    writer.close()
                    writer = None
                    os.replace(shards[-1] + ".tmp", shards[-1])
                shards.append(os.path.join(cache_dir, SHARD_PATTERN.format(len(shards))))
                writer = ArrayRecordWriter(shards[-1] + ".tmp", "group_size:1")
            writer.write(serialize_record({
                "latents": _encode(latents, dtype), "context": _encode(context, dtype),
                "context_length": np.int32(length), "name": np.str_(name)}))
            clips.append({"file": name, "size": size, "mtime_ns": mtime,
                          "frames": int(latents.shape[0]), "context_length": int(length)})
        writer.close()
        os.replace(shards[-1] + ".tmp", shards[-1])
        writer = None
    finally:
        if writer is not None:
            writer.close()
        if shards and os.path.exists(shards[-1] + ".tmp"):
            os.remove(shards[-1] + ".tmp")
    keep = {os.path.basename(s) for s in shards}
    for name in os.listdir(cache_dir):  # shards of an earlier, larger build
        if name.startswith("text-latents-") and name not in keep:
            os.remove(os.path.join(cache_dir, name))
    meta = {"format": FORMAT, "source_path": path, "dtype": dtype, "count": len(clips),
            "clips_per_shard": int(clips_per_shard), "clips": clips,
            "shards": sorted(keep), **first[1]}
    meta = _finish(cache_dir, meta, text_length)
    write_json(meta_path, meta, indent=1)
    logging.info("cached %d text-latent clips from %s in %s", len(clips), path, cache_dir)
    return meta


def _finish(cache_dir: str, meta: dict, text_length: int | None) -> dict:
    longest = max(c["context_length"] for c in meta["clips"])
    meta["text_length"] = int(text_length) if text_length is not None else max(longest, 1)
    meta["truncated_clips"] = sum(c["context_length"] > meta["text_length"] for c in meta["clips"])
    if meta["truncated_clips"]:
        logging.warning("%s: %d clips have contexts longer than text_length=%d; they are "
                        "truncated", cache_dir, meta["truncated_clips"], meta["text_length"])
    return meta


class TextLatentSource:
    """Random-access training source over a text-latent cache (data-source contract).

    `source[index]` reads clip `index % len(source)`; when the clip has more latent frames than
    `num_frames`, the window start is drawn from np.random.default_rng((seed, index)) (the
    pipeline passes indices that grow across epochs: `epoch_indexed`). Returns {'video': float32
    (num_frames, h, w, C), 'context': float32 (text_length, D), 'context_mask': bool
    (text_length,), 'label': int32 0}. num_frames=None: every clip's length, which must agree.
    """

    epoch_indexed = True
    num_classes = 0

    def __init__(self, cache_dir: str, *, num_frames: int | None, seed: int):
        self.cache_dir = os.path.abspath(cache_dir)
        self.meta = read_meta(self.cache_dir)
        self.paths = [os.path.join(self.cache_dir, name) for name in self.meta["shards"]]
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"{missing[0]} is missing: the cache in {self.cache_dir} is "
                              f"incomplete; rebuild it (set data.path to the clip files)")
        clips = self.meta["clips"]
        frames = [c["frames"] for c in clips]
        if num_frames is None:
            if len(set(frames)) > 1:
                raise ConfigError(f"the clips of {self.cache_dir} have {min(frames)} to "
                                  f"{max(frames)} latent frames; set model.num_frames")
            num_frames = frames[0]
        self.num_frames = int(num_frames)
        short = min(range(len(clips)), key=frames.__getitem__)
        if frames[short] < self.num_frames:
            raise ConfigError(
                f"{clips[short]['file']} has {frames[short]} latent frames, fewer than "
                f"model.num_frames={self.num_frames}; lower model.num_frames or drop that clip")
        self.seed = int(seed)
        self.text_length = int(self.meta["text_length"])
        self.dtype = self.meta["dtype"]
        self._length = int(self.meta["count"])
        self._reader = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """One example's video shape (F, h, w, C)."""
        return (self.num_frames, self.meta["height"], self.meta["width"], self.meta["channels"])

    def _source(self):
        if self._reader is None:  # opened lazily, once per (worker) process
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource(self.paths)
            if len(self._reader) != self._length:
                raise ConfigError(f"{self.cache_dir}: cache.json lists {self._length} clips but "
                                  f"the shards hold {len(self._reader)}; rebuild the cache")
        return self._reader

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def __len__(self) -> int:
        return self._length

    def record(self, clip_index: int) -> dict[str, np.ndarray]:
        """Clip `clip_index` as stored, decoded to float32: latents (F, h, w, C), context (n, D)."""
        record = deserialize_record(self._source()[int(clip_index)])
        for key in ("latents", "context"):
            record[key] = _decode(record[key], self.dtype)
        return record

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if index < 0:
            raise IndexError(f"index {index} < 0")
        record = self.record(index % self._length)
        total = record["latents"].shape[0]
        start = 0
        if total > self.num_frames:
            start = int(np.random.default_rng((self.seed, index)).integers(total - self.num_frames + 1))
        n = min(int(record["context_length"]), self.text_length)
        context = np.zeros((self.text_length, record["context"].shape[1]), np.float32)
        context[:n] = record["context"][:n]
        return {
            "video": record["latents"][start:start + self.num_frames],
            "context": context,
            "context_mask": np.arange(self.text_length) < n,
            "label": np.int32(0),
        }


def check_model(source: TextLatentSource, model: Mapping[str, Any], num_classes: int) -> None:
    """One ConfigError line when the cached clips do not fit the model config: model.in_channels,
    the spatial patch (int p or (t, h, w)), model.input_size (DiT: square latents), model.text_dim
    (Wan), model.num_classes (text conditioning has no labels)."""
    f, h, w, c = source.shape
    where = f"the clips in {source.meta['source_path']}"
    channels = model.get("in_channels")
    if channels is None:
        raise ConfigError("config model.in_channels is not set; pass --config.model.in_channels=...")
    if int(channels) != c:
        raise ConfigError(f"{where} have {c} latent channels but model.in_channels={channels}; "
                          f"set model.in_channels={c}")
    patch = model.get("patch_size") or 1
    sizes = [int(p) for p in np.atleast_1d(patch)]
    pt, ph, pw = {1: [1, *sizes * 2], 2: [1, *sizes], 3: sizes}.get(len(sizes), [1, 1, 1])
    if h % ph or w % pw or f % pt:
        raise ConfigError(f"{where} are {f} x {h} x {w} latents (F x h x w), not divisible by "
                          f"model.patch_size={tuple(sizes)}")
    size = model.get("input_size")
    if size is not None and (h, w) != (int(size), int(size)):
        raise ConfigError(f"{where} are {h} x {w} latents but model.input_size={size}")
    text_dim = model.get("text_dim")
    if text_dim is not None and int(text_dim) != source.meta["context_dim"]:
        raise ConfigError(f"{where} have {source.meta['context_dim']}-wide text contexts but "
                          f"model.text_dim={text_dim}")
    if num_classes:
        raise ConfigError(f"data.source='text_latents' has no class labels but "
                          f"model.num_classes={num_classes}; set model.num_classes=0")
