"""fvdm_jax: the Frame-Aware Video Diffusion Model (vectorized timesteps) in JAX/Flax."""

__version__ = "0.1.0"
