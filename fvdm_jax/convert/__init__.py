"""Weight converters from other codebases' checkpoints into fvdm_jax inference checkpoints."""
