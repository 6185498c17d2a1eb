"""The demo config shrunk for tests that train it and evaluate it with the real I3D."""

import os

from fvdm_jax.config.load import load_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def tiny_demo_config(num_frames: int = 9):
    """configs/demo.py with a 32-wide 2-block model on `num_frames` (>= 9 for I3D) frames, one
    device, 2 synchronous training steps, 2-step samplers of 2 videos, no training samples."""
    config = load_config(os.path.join(ROOT, "configs", "demo.py"))
    model = config.model
    model.hidden_size, model.depth, model.num_heads, model.num_frames = 32, 2, 2, num_frames
    config.mesh.shape = (1, 1, 1)
    config.train.num_steps = 2
    config.train.log_every_steps = 1
    config.checkpoint.async_save = False
    config.sample.every_steps = 0
    config.sample.num_steps = 2
    config.sample.batch_size = 2
    config.eval.num_frames = num_frames
    config.eval.batch_size = 2
    return config
