"""What every layer runs on: the mesh and shardings, multi-process start, files and URLs, the
console, metric writers. It imports nothing of the project but fvdm_jax.errors."""
