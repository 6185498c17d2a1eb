"""Networks: the FVDM video DiT (and, alongside it, the autoencoder and the FVD detector)."""

from fvdm_jax.models.dit import MODEL_SIZES, DiT, drop_labels, model_from_config

__all__ = ["DiT", "MODEL_SIZES", "drop_labels", "model_from_config"]
