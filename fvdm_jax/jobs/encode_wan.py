"""`--mode=encode` of a Wan config: a folder of captioned videos -> per-clip text-latent files,
which `data.source=text_latents` trains on.

data.path is the video folder (`fvdm_jax/data/captioned.py`: videos found as the video_folder
source finds them, captions from `<video>.txt` beside each video or the root's `metadata.csv`).
Each video gives one clip: its first 1 + 4 (model.num_frames - 1) frames, every
encoders.frame_interval-th, resized to cover model.wan.latent_size x 8 pixels and center-cropped;
the Wan VAE (encoders.vae) makes its normalised latents (posterior mean), the UMT5 encoder
(encoders.text) the context of its caption (the real tokens' hidden states). One file per video,
OUT/<relative video path>.npz (OUT = encoders.output_dir, default WORKDIR/text_latent_clips):
latents (C, F, h, w) float32, context (n, D) float32, context_length () int32, caption () str,
the layout fvdm_jax/data/text_latents.py reads.

Resumable: a clip whose file exists is skipped; files are written atomically (a temporary name,
then a rename; temporaries of an interrupted run are removed at the start). OUT/encode.json
records the settings, and a rerun with other settings into the same OUT is refused. A video too
short or unreadable is skipped with a warning and listed in encode.json. With several processes
each encodes every process_count-th video on its first local device; the encoders are not
sharded over the mesh (each process holds both: UMT5-XXL is 11 GB in bf16).
"""

from __future__ import annotations

import logging
import os
import re

import jax
import numpy as np

from fvdm_jax.data.captioned import captioned_videos, read_clip
from fvdm_jax.data.video import VideoReadError
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.build import flat_model_config
from fvdm_jax.runtime import files
from fvdm_jax.sampling.wan_encoders import WanTextEncoder, WanVideoVAE

SETTINGS_FILE = "encode.json"
FORMAT = "fvdm_wan_clips/1"
# fvdm_jax.runtime.files.atomic_path's temporary names: <clip>.tmp<pid>-<8 hex>.npz
_TEMPORARY = re.compile(r"^(.*)\.tmp\d+-[0-9a-f]{8}\.npz$")


def clips_dir(config, workdir: str) -> str:
    return config.encoders.get("output_dir") or os.path.join(workdir, "text_latent_clips")


def clip_path(out: str, relative_path: str) -> str:
    return os.path.join(out, *relative_path.split("/")) + ".npz"


def _remove_temporaries(out: str, targets: set[str]) -> None:
    """Deletes what an interrupted run left of the clip files `targets` (this process's own: a
    temporary of another process may be in the middle of its write)."""
    for folder, _, names in os.walk(out):
        for name in names:
            match = _TEMPORARY.match(name)
            if match and os.path.join(folder, match.group(1) + ".npz") in targets:
                os.remove(os.path.join(folder, name))


def _settings(config, frames: int, size: tuple[int, int]) -> dict:
    enc, data = config.encoders, config.data
    absolute = lambda p: os.path.abspath(os.path.expanduser(p)) if p else None  # noqa: E731
    return {"format": FORMAT, "source_path": absolute(data.path), "vae": absolute(enc.vae),
            "text": absolute(enc.text), "tokenizer": absolute(enc.get("tokenizer")),
            "text_length": int(enc.text_length), "dtype": enc.dtype,
            "frame_interval": int(enc.frame_interval), "video_frames": int(frames),
            "latent_frames": int(config.model.num_frames), "pixel_size": list(size)}


def _check_settings(out: str, settings: dict, write: bool) -> None:
    """ConfigError (one line) when OUT holds clips of other settings; else records them (write:
    process 0)."""
    import json

    path = os.path.join(out, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f).get("settings", {})
        changed = [k for k in settings if previous.get(k) != settings[k]]
        if changed:
            key = changed[0]
            raise ConfigError(f"{out} holds clips encoded with other settings ({key}: "
                              f"{previous.get(key)!r} there, {settings[key]!r} now); choose "
                              f"another encoders.output_dir or remove it")
        return
    if write:
        files.write_json(path, {"settings": settings, "status": "started"}, indent=1)


def encode_wan_clips(config, workdir: str, vae: WanVideoVAE | None = None,
                     text: WanTextEncoder | None = None) -> str:
    """Encodes data.path's captioned videos into per-clip .npz files; returns their folder."""
    data, enc = config.data, config.encoders
    if not data.get("path"):
        raise ConfigError("data.path is not set: point it at the folder of captioned videos")
    model = flat_model_config(config.model)
    latent_h, latent_w = (int(v) for v in model["latent_size"])
    videos = captioned_videos(data.path)  # every caption checked before anything is encoded
    out = clips_dir(config, workdir)
    os.makedirs(out, exist_ok=True)
    main = jax.process_index() == 0
    mine = [v for i, v in enumerate(videos) if i % jax.process_count() == jax.process_index()]
    todo = [v for v in mine if not os.path.exists(clip_path(out, v.relative_path))]
    vae = vae or WanVideoVAE(enc, latent_channels=model["in_channels"])
    frames = vae.video_frames(int(model["num_frames"]))
    size = (latent_h * vae.spatial_factor, latent_w * vae.spatial_factor)
    _check_settings(out, _settings(config, frames, size), write=main)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fvdm_jax_encode_wan_settings")
    _remove_temporaries(out, {clip_path(out, v.relative_path) for v in mine})
    if todo:
        text = text or WanTextEncoder(enc, text_dim=model["text_dim"])
    skipped, written = [], 0
    bar = files.progress(len(mine), "encoding", leave=True)
    if bar is not None:
        bar.update(len(mine) - len(todo))
    for video in todo:
        try:
            pixels = read_clip(video.path, frames, int(enc.frame_interval), *size)
        except VideoReadError as e:  # too short, corrupt: skip it, never stop the job
            logging.warning("skipping %s (a clip is %d frames, every %d-th): %s",
                            video.relative_path, frames, int(enc.frame_interval), e)
            skipped.append(video.relative_path)
            continue
        latents = vae.encode(pixels[None])[0]  # (F, h, w, C)
        context = text.encode(video.caption)[0]  # (n, D)
        target = clip_path(out, video.relative_path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        files.savez(target, latents=np.ascontiguousarray(np.transpose(latents, (3, 0, 1, 2))),
                    context=context, context_length=np.int32(len(context)),
                    caption=np.str_(video.caption))
        written += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fvdm_jax_encode_wan_done")
    if main:
        import json

        path = os.path.join(out, SETTINGS_FILE)
        with open(path) as f:
            record = json.load(f)
        missing = [v.relative_path for v in videos
                   if not os.path.exists(clip_path(out, v.relative_path))]
        record.update(status="done", clips=len(videos) - len(missing), videos=len(videos),
                      skipped=missing)
        files.write_json(path, record, indent=1)
    logging.info("encoded %d clips into %s (%d skipped)", written, out, len(skipped))
    return out
