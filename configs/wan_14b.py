"""Wan 2.1 T2V 14B with FVDM's per-frame (vectorized) timesteps: configs/wan_1_3b.py's recipe
with the 14B network, its weights sharded over 'fsdp' (mesh.shape (1, -1, 1)) and every block
recomputed in the backward pass."""

from fvdm_jax.config.load import load_sibling

base = load_sibling(__file__, "wan_1_3b")


def get_config():
    config = base.get_config()
    config.model.wan.size = "14B"
    config.model.remat = "full"
    config.mesh.shape = (1, -1, 1)
    return config
