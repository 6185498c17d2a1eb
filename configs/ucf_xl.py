"""FVDM-XL/2 on UCF101, class-conditional: 101 classes with label dropout 0.1 (the null class
enables classifier-free guidance), clipping from step 100k. Otherwise the FaceForensics recipe
(configs/ffs_xl.py, which explains how to scale batch and learning rate)."""

from fvdm_jax.config.load import load_sibling

ffs_xl = load_sibling(__file__, "ffs_xl")


def get_config():
    config = ffs_xl.get_config()
    config.model.num_classes = 101
    config.data.dataset = "ucf101"
    config.train.grad_clip_start_step = 100_000
    config.eval.subsample_factor = 3  # FVD real clips: every 3rd frame (StyleGAN-V / Latte UCF101)
    return config
