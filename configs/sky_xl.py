"""FVDM-XL/2 on SkyTimelapse: the FaceForensics recipe (configs/ffs_xl.py, which explains how to
scale batch and learning rate) with clipping from step 100k as the official Sky run."""

from fvdm_jax.config.load import load_sibling

ffs_xl = load_sibling(__file__, "ffs_xl")


def get_config():
    config = ffs_xl.get_config()
    config.data.dataset = "sky"
    config.train.grad_clip_start_step = 100_000
    return config
