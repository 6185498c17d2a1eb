"""A model small enough to train in seconds on CPU (tests and smoke runs)."""

from fvdm_jax.config.load import load_sibling

default = load_sibling(__file__, "default")


def get_config():
    config = default.get_config()
    model = config.model
    model.size = "custom"
    model.hidden_size, model.depth, model.num_heads = 32, 2, 2
    model.num_frames, model.input_size, model.in_channels, model.patch_size = 4, 8, 4, 2

    config.data.num_examples = 64

    config.train.num_steps = 20
    config.train.batch_size = 8
    config.train.lr = 1e-3
    config.train.grad_clip_start_step = 0
    config.train.log_every_steps = 5

    config.checkpoint.every_steps = 10
    config.checkpoint.keep = 2
    return config
