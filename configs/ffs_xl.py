"""FVDM-XL/2 on FaceForensics: the official recipe.

AdamW 1e-4 (no weight decay, constant), EMA 0.9999, global-norm clip 0.1 from step 500k, global
batch 4, 16 frames of 32x32x4 SD-VAE latents (256x256 video), PTSS p=0.2 with one coin per step,
250k steps. Other sizes are one override away: --config.model.size=B (or S, L).

Scaling to bigger meshes: train.batch_size is the GLOBAL batch and must be divisible by the
data x fsdp mesh size (the run fails at start otherwise). With N times the batch (e.g. 32 on 8
GPUs), scale the learning rate by sqrt(N) (AdamW) as a starting point, e.g. 1e-4 * sqrt(8) ~ 2.8e-4,
add a short warmup (train.warmup_steps ~ 1000), and divide train.num_steps by N for the same
number of training videos. XL fits plain data parallelism on 80 GB GPUs; on smaller devices or
for larger batches shard the weights with mesh.shape=(-1, 8, 1) (FSDP) and/or heads/MLP with a
tensor axis, or trade compute for memory with model.remat=dots and train.grad_accum_steps.
mesh.fit=True (set here) makes that choice at start from the compiler's memory plan; check a slice
before renting it with --mode=compile (docs/scaling.md).
"""

from fvdm_jax.config.load import load_sibling

default = load_sibling(__file__, "default")


def get_config():
    config = default.get_config()

    # Encode the videos once (--mode=encode --config.data.path=/data/FaceForensics
    # --config.vae.checkpoint=/models/sd-vae-ft-ema), then train on the cache in WORKDIR/latents.
    config.data.source = "latents"
    config.data.dataset = "ffs"
    # The layout (mesh, remat, micro-batches) resolves at start to the first whose train step the
    # compiler fits in the chips' memory (logged in the banner; training/fit.py), e.g. on a v5e-8
    # at batch 4: data 2 x fsdp 2 x tensor 2 without remat (docs/scaling.md).
    config.mesh.fit = True
    # Everything else of the recipe above (XL/2 on 16 x 32 x 32 x 4 latents, PTSS p = 0.2 per
    # batch, AdamW 1e-4, EMA 0.9999, clip 0.1 from 500k, batch 4, 250k steps; FVD: StyleGAN-V's
    # fvd2048_16f on the train split, consecutive frames) is configs/default.py's default.
    return config
