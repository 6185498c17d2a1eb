"""A Wan 2.1 model small enough to train in seconds on CPU, with rectified flow and per-frame
levels. As shipped it trains on synthetic text-conditional latents (no files); for precomputed
text latents set --config.data.source=text_latents --config.data.path=DIR, a folder of per-clip
.npz files (latents (4, F >= 4, h, w) with h, w even; context (L, 16)) or .pth files (DiffSynth /
Pusa layout); fvdm_jax/data/text_latents.py caches them in WORKDIR/text_latents."""

from fvdm_jax.config.load import load_sibling

default = load_sibling(__file__, "default")


def get_config():
    config = default.get_config()
    model = config.model
    model.architecture = "wan"
    model.num_frames, model.in_channels = 4, 4
    wan = model.wan
    wan.size = "custom"
    wan.dim, wan.ffn_dim, wan.num_heads, wan.num_layers = 24, 32, 2, 2
    wan.freq_dim, wan.text_dim, wan.rope_max_seq_len = 32, 16, 32
    wan.latent_size = (8, 8)

    config.diffusion.process = "flow"

    config.data.source = "synthetic"
    config.data.text_length = 8

    config.train.num_steps = 20
    config.train.batch_size = 8
    config.train.lr = 1e-3
    config.train.grad_clip_start_step = 0
    config.train.log_every_steps = 5
    config.train.ema_decay = 0.99  # a horizon of ~100 steps: short runs sample trained weights

    config.checkpoint.every_steps = 10
    config.checkpoint.keep = 2
    return config
