"""Every knob of fvdm_jax, with its default. Other configs import this and override.

Run any config with command-line overrides, e.g. --config.model.size=B --config.ptss.p=0.3.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    config = config_dict.ConfigDict()

    # The video DiT (Latte backbone with per-frame adaLN-Zero timesteps).
    config.model = model = config_dict.ConfigDict()
    model.size = "XL"  # S / B / L / XL (dims below from the table), or 'custom' (set them).
    model.hidden_size = config_dict.placeholder(int)  # only with size='custom'
    model.depth = config_dict.placeholder(int)  # spatial + temporal blocks; only with 'custom'
    model.num_heads = config_dict.placeholder(int)  # only with size='custom'
    model.patch_size = 2  # 2, 4 or 8 for the paper's variants
    model.mlp_ratio = 4.0
    model.num_frames = 16  # F: frames per clip (the temporal table has this length)
    model.input_size = 32  # H = W of the model input (latents: image size / 8)
    model.in_channels = 4  # C (4 for SD-VAE latents, 3 for pixels)
    model.learn_sigma = True  # output 2C channels: eps and the variance interpolation
    model.num_classes = 0  # 0 = unconditional; UCF101 uses 101
    model.class_dropout_prob = 0.1  # label dropout for classifier-free guidance (null class row)
    model.dtype = "float32"  # compute dtype: float32 / bfloat16
    model.param_dtype = "float32"  # master weights
    model.attention = "xla"  # xla / cudnn / auto (cudnn on GPU for bf16)
    model.scan_layers = True  # run the stacked blocks with nn.scan (False unrolls the scan)
    model.remat = "none"  # none / full / dots / dots_no_batch

    # The discrete diffusion process (its VP-SDE view: beta from 0.1 to 20 on [0, 1]).
    config.diffusion = diffusion = config_dict.ConfigDict()
    diffusion.num_timesteps = 1000  # T
    diffusion.beta_schedule = "linear"  # linear / cosine
    diffusion.beta_start = 1e-4  # linear only; scaled by 1000/T as the official schedule
    diffusion.beta_end = 0.02

    # PTSS: with probability p the frames of a video get independent timesteps.
    config.ptss = ptss = config_dict.ConfigDict()
    ptss.p = 0.2
    ptss.mode = "per_batch"  # per_batch (one coin per step, official) / per_sample

    return config
