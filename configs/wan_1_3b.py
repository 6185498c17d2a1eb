"""Wan 2.1 T2V 1.3B with FVDM's per-frame (vectorized) timesteps: rectified flow (shift 5) on
precomputed 480p text latents (data.path: the per-clip .pth files of DiffSynth-Studio's / Pusa's
data_process step, 21 latent frames = 81 video frames, UMT5 contexts padded to 512 tokens).
Start from the converted Wan weights once fine-tuning supports Wan (train.init_from is DiT-only
for now)."""

from fvdm_jax.config.load import load_sibling

default = load_sibling(__file__, "default")


def get_config():
    config = default.get_config()
    model = config.model
    model.architecture = "wan"
    model.num_frames, model.in_channels = 21, 16
    model.dtype = "bfloat16"
    model.attention = "auto"  # TPU: the splash kernel (32,760 tokens); GPU: cuDNN

    config.diffusion.process = "flow"

    config.data.source = "text_latents"
    config.data.text_length = 512
    config.data.cache_dtype = "bfloat16"

    config.train.batch_size = 8
    config.train.lr = 1e-5
    config.train.grad_clip = 1.0
    config.train.grad_clip_start_step = 0
    config.train.text_dropout_prob = 0.1
    return config
