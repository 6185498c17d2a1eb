"""Training data: sources following the data-source contract, and per-host grain batches."""

from fvdm_jax.data.pipeline import host_batches, make_source
from fvdm_jax.data.synthetic import SyntheticVideoSource

__all__ = ["SyntheticVideoSource", "host_batches", "make_source"]
