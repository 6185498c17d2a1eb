"""Training data: sources following the data-source contract, and per-host grain batches."""

from fvdm_jax.data.demo import DemoClipSource
from fvdm_jax.data.folder import VideoFolderSource
from fvdm_jax.data.latents import LatentCacheSource
from fvdm_jax.data.pipeline import host_batches, make_source
from fvdm_jax.data.synthetic import SyntheticVideoSource

__all__ = [
    "DemoClipSource",
    "LatentCacheSource",
    "SyntheticVideoSource",
    "VideoFolderSource",
    "host_batches",
    "make_source",
]
