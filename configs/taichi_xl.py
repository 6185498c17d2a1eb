"""FVDM-XL/2 on Taichi-HD: the FaceForensics recipe (configs/ffs_xl.py, which explains how to
scale batch and learning rate); clipping from step 500k as the official Taichi run."""

from fvdm_jax.config.load import load_sibling

ffs_xl = load_sibling(__file__, "ffs_xl")


def get_config():
    config = ffs_xl.get_config()
    config.data.dataset = "taichi"
    config.eval.subsample_factor = 6  # FVD real clips: every 6th frame (Latte's Taichi protocol)
    return config
