"""What --mode=sample needs of a Wan model: its weights, the sampler, and the text and frames of
video i of a job.

Video i of a job takes the text context (and, for a task that is given frames, its latent frames)
of example i of the configured data source (data.source=text_latents: the clips' prompts and
latents; synthetic: its prompts), so the same command samples the prompts and the held clips a
model was trained on, on any mesh. The unconditional branch of text guidance (sample.cfg_scale
!= 1) is the zero context that training's text dropout (train.text_dropout_prob) taught. The
latents are decoded to pixels by the VAE in vae.checkpoint when there is one; without it the
job's media show the first three latent channels (`latent_preview`), and the latents themselves
are saved.
"""

from __future__ import annotations

import numpy as np

from fvdm_jax.diffusion import flow
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.build import flat_model_config
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.sampling.wan_sampler import TASKS, WanSampler
from fvdm_jax.sampling.weights import load_sampling_params


def parse_indices(text) -> list[int] | None:
    if text in (None, ""):
        return None
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"sample.frame_indices={text!r} must be comma-separated integers, "
                          f"e.g. 0,10,20") from None


def latent_preview(latents: np.ndarray) -> np.ndarray:
    """(B, F, h, w, C) latents -> (B, F, h, w, 3) in [-1, 1]: the first three channels (a
    picture of the sampled latents where no decoder is configured, not a decoded video)."""
    x = np.asarray(latents, np.float32)[..., :3]
    if x.shape[-1] < 3:
        x = np.concatenate([x] + [x[..., -1:]] * (3 - x.shape[-1]), axis=-1)
    return np.clip(x, -1.0, 1.0)


class WanJob:
    """The Wan model of a config, its weights and its data: `latents(task, rng, indices)` samples
    videos `indices` of a job, `model_config` is the sampled model's."""

    def __init__(self, config, workdir: str, devices=None):
        from fvdm_jax.data.pipeline import make_source

        s = config.sample
        if s.task not in TASKS:
            raise ConfigError(f"sample.task={s.task!r}: a Wan model samples {', '.join(TASKS)}")
        if s.get("inputs"):
            raise ConfigError("sample.inputs (image / video files) needs the Wan VAE to encode "
                              "them; leave it unset to take frames and prompts from data")
        model_config, diffusion_config, params = load_sampling_params(config, workdir)
        self.model_config = dict(flat_model_config(model_config))
        mesh = shd.make_mesh(config.mesh, devices)
        rules = shd.rules_from_config(config.mesh)
        self.source = make_source(config.data, self._data_model(config), config.get("vae"),
                                  workdir=workdir)
        first = self.source[0]
        num_frames, h, w, _ = first["video"].shape
        self.sampler = WanSampler(
            self.model_config, flow.FlowSchedule.from_config(diffusion_config), mesh=mesh,
            rules=rules, params=params, num_steps=int(s.num_steps), cfg_scale=float(s.cfg_scale),
            noise_multiplier=float(s.noise_multiplier), num_frames=num_frames, latent_hw=(h, w))
        self.task = s.task
        self.frame_indices = parse_indices(s.get("frame_indices"))
        overlap = s.get("overlap")
        self.overlap = int(overlap or (num_frames // 4 if s.task == "transition" else num_frames // 2))
        if s.task == "transition" and not 0 < 2 * self.overlap < num_frames:
            raise ConfigError(f"transition overlap={self.overlap} must be >= 1 and < num_frames / 2 "
                              f"= {num_frames / 2}")
        self._given(first["video"])  # a bad frame choice fails here, before any sampling

    def _data_model(self, config) -> dict:
        """The data's view of the model: the trained model's shape keys over the config's."""
        data_model = dict(flat_model_config(config.model))
        for key in ("in_channels", "text_dim", "num_frames", "patch_size"):
            if self.model_config.get(key) is not None:
                data_model[key] = self.model_config[key]
        return data_model

    def _given(self, clip: np.ndarray, after: np.ndarray | None = None) -> np.ndarray | None:
        """The latent frames the task is given, from one data clip (F, h, w, C) (transition:
        clip A's last and `after`'s (clip B's) first sample.overlap frames)."""
        if self.task == "transition":
            o = int(self.overlap)
            return np.concatenate([clip[-o:], (clip if after is None else after)[:o]])
        if self.task == "generate":
            return None
        if self.task == "i2v":
            return clip[:1]
        if self.task == "extend":
            return clip[: int(self.overlap)]
        if self.frame_indices is not None:
            bad = [i for i in self.frame_indices if not 0 <= i < clip.shape[0]]
            if bad:
                raise ConfigError(f"sample.frame_indices {bad} lie outside the clip's "
                                  f"{clip.shape[0]} latent frames")
            return clip[self.frame_indices]
        if self.task == "interpolate":
            return clip[[0, clip.shape[0] - 1]]
        raise ConfigError(f"task {self.task} needs sample.frame_indices, e.g. 0,10,20")

    def latents(self, rng, indices) -> np.ndarray:
        """Videos `indices` of the job: float32 latents (B, F, h, w, C)."""
        n = len(self.source)
        if self.task == "transition":  # video i: from example 2i to example 2i + 1, A's text
            pairs = [(self.source[2 * i % n], self.source[(2 * i + 1) % n]) for i in indices]
            items = [a for a, _ in pairs]
            given = [self._given(a["video"], b["video"]) for a, b in pairs]
        else:
            items = [self.source[i % n] for i in indices]
            given = [self._given(item["video"]) for item in items]
        context = np.stack([item["context"] for item in items])
        model_inputs = None if given[0] is None else np.stack(given)
        frame_indices = None
        if self.task in ("interpolate", "any_frame"):
            frame_indices = self.frame_indices
        return self.sampler.run(self.task, rng, context=context,
                                null_context=np.zeros_like(context[:1]),
                                model_inputs=model_inputs, frame_indices=frame_indices,
                                batch_size=len(indices))

    def compilations(self) -> int:
        return self.sampler.compilations()
