"""What --mode=sample needs of a Wan model: its weights, the sampler, the encoders, and the text
and frames of video i of a job.

Text. With sample.prompts ('|'-separated, cycled: video i takes prompt i mod P) the UMT5 encoder
of encoders.text encodes them (zero-padded to encoders.text_length, as Wan pads its prompts);
otherwise video i takes the text context of example i of the configured data source
(data.source=text_latents: the clips' prompts; synthetic: its prompts), so the same command
samples the prompts a model was trained on. The unconditional branch of text guidance
(sample.cfg_scale != 1) is the encoded sample.negative_prompt when prompts are given or a
negative prompt is set ('' is the empty prompt, as in Wan's pipelines), else the zero context that
training's text dropout (train.text_dropout_prob) taught.

Frames. A task that is given frames takes them from sample.inputs (images / videos, comma-
separated) encoded by the Wan VAE of encoders.vae: i2v the first frame of input i mod N for video
i (one latent frame), extend its first 1 + 4 (K - 1) frames (K = sample.overlap latent frames),
transition the last 1 + 4 (o - 1) frames of input 1 and the first of input 2 (o = sample.overlap),
interpolate / any_frame every input's first frame, each encoded alone as a one-frame video, as the
K given frames of every video (at frames 0 and F - 1, or at sample.frame_indices). Without
sample.inputs the frames are the latents of example i of the data source (transition: examples 2i
and 2i + 1). Inputs are resized to cover the latent window x 8 pixels and center-cropped.

Window. F x h x w latents: the data's clip shape when a data source is read, else
model.num_frames (the trained model's) x model.wan.latent_size. With encoders.vae the sampled
latents are decoded to pixel videos (1 + 4 (F - 1) frames of 8h x 8w); without it the job's media
show the first three latent channels (`latent_preview`). The latents are saved either way.
"""

from __future__ import annotations

import numpy as np

from fvdm_jax.diffusion import flow
from fvdm_jax.errors import ConfigError
from fvdm_jax.models.build import flat_model_config
from fvdm_jax.runtime import sharding as shd
from fvdm_jax.sampling.wan_sampler import TASKS, WanSampler
from fvdm_jax.sampling.weights import load_sampling_params

PROMPT_SEPARATOR = "|"


def parse_indices(text) -> list[int] | None:
    if text in (None, ""):
        return None
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"sample.frame_indices={text!r} must be comma-separated integers, "
                          f"e.g. 0,10,20") from None


def parse_prompts(text) -> list[str]:
    """sample.prompts -> the prompts ('|'-separated, stripped; empty pieces dropped)."""
    if text in (None, ""):
        return []
    prompts = [p.strip() for p in str(text).split(PROMPT_SEPARATOR) if p.strip()]
    if not prompts:
        raise ConfigError(f"sample.prompts={text!r} holds no prompt; separate prompts with "
                          f"'{PROMPT_SEPARATOR}'")
    return prompts


def parse_paths(text) -> list[str]:
    return [p.strip() for p in str(text or "").split(",") if p.strip()]


def latent_preview(latents: np.ndarray) -> np.ndarray:
    """(B, F, h, w, C) latents -> (B, F, h, w, 3) in [-1, 1]: the first three channels (a
    picture of the sampled latents where no decoder is configured, not a decoded video)."""
    x = np.asarray(latents, np.float32)[..., :3]
    if x.shape[-1] < 3:
        x = np.concatenate([x] + [x[..., -1:]] * (3 - x.shape[-1]), axis=-1)
    return np.clip(x, -1.0, 1.0)


class WanJob:
    """The Wan model of a config, its weights, encoders and data: `latents(rng, indices)` samples
    videos `indices` of a job, `pixels(latents)` shows them, `model_config` is the sampled
    model's."""

    def __init__(self, config, workdir: str, devices=None):
        from fvdm_jax.sampling.wan_encoders import WanTextEncoder, WanVideoVAE

        s, encoders = config.sample, config.get("encoders") or {}
        if s.task not in TASKS:
            raise ConfigError(f"sample.task={s.task!r}: a Wan model samples {', '.join(TASKS)}")
        self.task = s.task
        self.prompts = parse_prompts(s.get("prompts"))
        self.inputs = parse_paths(s.get("inputs"))
        negative = s.get("negative_prompt") or ""
        self._check_encoders(encoders, negative)
        model_config, diffusion_config, params = load_sampling_params(config, workdir)
        self.model_config = dict(flat_model_config(model_config))
        self.vae = None
        if encoders.get("vae"):
            self.vae = WanVideoVAE(encoders, latent_channels=self.model_config.get("in_channels"))
        text = None
        if self.prompts or negative:
            text = WanTextEncoder(encoders, text_dim=self.model_config.get("text_dim"))
        self.frame_indices = parse_indices(s.get("frame_indices"))
        frames_from_data = self.task != "generate" and not self.inputs
        self.source, first = None, None
        if not self.prompts or frames_from_data:
            from fvdm_jax.data.pipeline import make_source

            self.source = make_source(config.data, self._data_model(config), config.get("vae"),
                                      workdir=workdir)
            first = self.source[0]
            num_frames, h, w, _ = first["video"].shape
        else:
            num_frames = int(self.model_config.get("num_frames") or config.model.num_frames)
            h, w = (int(v) for v in flat_model_config(config.model)["latent_size"])
        self.num_frames, self.latent_hw = int(num_frames), (int(h), int(w))
        overlap = s.get("overlap")
        self.overlap = int(overlap or (num_frames // 4 if s.task == "transition" else num_frames // 2))
        if s.task == "transition" and not 0 < 2 * self.overlap < num_frames:
            raise ConfigError(f"transition overlap={self.overlap} must be >= 1 and < num_frames / 2 "
                              f"= {num_frames / 2}")
        self.sampler = WanSampler(
            self.model_config, flow.FlowSchedule.from_config(diffusion_config),
            mesh=shd.make_mesh(config.mesh, devices), rules=shd.rules_from_config(config.mesh),
            params=params, num_steps=int(s.num_steps), cfg_scale=float(s.cfg_scale),
            noise_multiplier=float(s.noise_multiplier), num_frames=num_frames, latent_hw=(h, w))
        self.text, self.dtype = text, encoders.get("dtype")
        self.contexts = text.padded(self.prompts) if self.prompts else None  # (P, L, D)
        self.null = text.padded([negative]) if text is not None else None  # (1, L, D)
        self.given_inputs = self._input_latents() if self.inputs else None
        if first is not None and frames_from_data:
            self._given(first["video"])  # a bad frame choice fails here, before any sampling

    def _check_encoders(self, encoders, negative: str) -> None:
        if (self.prompts or negative) and not encoders.get("text"):
            key = "prompts" if self.prompts else "negative_prompt"
            raise ConfigError(f"sample.{key} needs the UMT5 text encoder: set encoders.text (a UMT5 "
                              f"encoder folder or models_t5_umt5-xxl-enc-bf16.pth), or leave "
                              f"sample.{key} unset to sample the data's text contexts")
        if self.inputs and not encoders.get("vae"):
            raise ConfigError("sample.inputs (image / video files) needs the Wan VAE to encode "
                              "them: set encoders.vae, or leave sample.inputs unset to take frames "
                              "and prompts from data")
        if self.inputs and self.task == "generate":
            raise ConfigError("sample.inputs: task generate is given no frames; use i2v, "
                              "interpolate, any_frame, extend or transition, or leave "
                              "sample.inputs unset")

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

    def _input_latents(self) -> list[np.ndarray]:
        """The given latent frames of sample.inputs, each (K, h, w, C): one per input for i2v and
        extend (video i takes entry i mod N), one entry for every video otherwise (transition:
        clip A's last and clip B's first frames; interpolate / any_frame: every input's frame)."""
        from fvdm_jax.data import media

        h, w = self.latent_hw
        size = (h * self.vae.spatial_factor, w * self.vae.spatial_factor)
        need = self.vae.video_frames(self.overlap)

        def frames(path, last: bool = False):
            pixels = media.load_input(path, size, None if last else need)
            if len(pixels) < need:
                raise ConfigError(f"sample input {path} has {len(pixels)} frames; {self.task} with "
                                  f"sample.overlap={self.overlap} latent frames needs {need} "
                                  f"(1 + 4 (overlap - 1))")
            return self.vae.encode((pixels[-need:] if last else pixels[:need])[None])[0]

        if self.task == "extend":
            given = [frames(path) for path in self.inputs]
        elif self.task == "transition":
            if len(self.inputs) != 2:
                raise ConfigError(f"task transition takes 2 sample.inputs (clip A, clip B), got "
                                  f"{len(self.inputs)}: --config.sample.inputs=a.mp4,b.mp4")
            given = [np.concatenate([frames(self.inputs[0], last=True), frames(self.inputs[1])])]
        else:  # one latent frame per input: its first frame encoded alone
            given = [self.vae.encode(media.load_input(path, size, 1)[None, :1])[0]
                     for path in self.inputs]
            if self.task != "i2v":
                given = [np.concatenate(given)]
        indices = self.frame_indices if self.task in ("interpolate", "any_frame") else None
        self.sampler._frames(self.task, len(given[0]), indices, self.num_frames)  # one-line errors
        return given

    def _context(self, items, indices) -> np.ndarray:
        if self.contexts is not None:
            return self.contexts[[i % len(self.contexts) for i in indices]]
        return np.stack([item["context"] for item in items])

    def latents(self, rng, indices) -> np.ndarray:
        """Videos `indices` of the job: float32 latents (B, F, h, w, C)."""
        items, given = None, None
        n = 0 if self.source is None else len(self.source)
        if self.source is not None and self.task == "transition":
            # video i: from example 2i to example 2i + 1, A's text
            pairs = [(self.source[2 * i % n], self.source[(2 * i + 1) % n]) for i in indices]
            items = [a for a, _ in pairs]
            given = [self._given(a["video"], b["video"]) for a, b in pairs]
        elif self.source is not None:
            items = [self.source[i % n] for i in indices]
            given = [self._given(item["video"]) for item in items]
        context = self._context(items, indices)
        null = self.null if self.null is not None else np.zeros_like(context[:1])
        if self.task == "generate":
            model_inputs = None
        elif self.given_inputs is not None:
            model_inputs = np.stack([self.given_inputs[i % len(self.given_inputs)] for i in indices])
        else:
            model_inputs = np.stack(given)
        frame_indices = None
        if self.task in ("interpolate", "any_frame"):
            frame_indices = self.frame_indices
        return self.sampler.run(self.task, rng, context=context, null_context=null,
                                model_inputs=model_inputs, frame_indices=frame_indices,
                                batch_size=len(indices))

    def pixels(self, latents: np.ndarray) -> np.ndarray:
        """What the job's videos show: the VAE's decoded pixels (B, 1 + 4 (F - 1), 8h, 8w, 3)
        in [-1, 1] with encoders.vae, else `latent_preview`."""
        if self.vae is None:
            return latent_preview(latents)
        return self.vae.decode(latents)

    def settings(self) -> dict:
        """The encoders a job's videos depend on (its sample.json refuses other ones)."""
        return {"vae": None if self.vae is None else self.vae.path,
                "text": None if self.text is None else self.text.path,
                "tokenizer": None if self.text is None else self.text.tokenizer.path,
                "text_length": None if self.text is None else self.text.text_length,
                "dtype": self.dtype}

    def compilations(self) -> int:
        return self.sampler.compilations()
