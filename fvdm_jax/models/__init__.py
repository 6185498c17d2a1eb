"""Networks: the FVDM video DiT, the Wan 2.1 text-to-video DiT (and, alongside them, the
autoencoder and the FVD detector)."""

from fvdm_jax.models.build import model_from_config
from fvdm_jax.models.dit import MODEL_SIZES, DiT, drop_labels
from fvdm_jax.models.wan import WAN_SIZES, Wan, wan_from_config, wan_model_config

__all__ = [
    "DiT",
    "MODEL_SIZES",
    "WAN_SIZES",
    "Wan",
    "drop_labels",
    "model_from_config",
    "wan_from_config",
    "wan_model_config",
]
