"""Test-session setup, before jax is imported anywhere: every test sees 8 host CPU devices.

Tests compile many small programs on a 2-core CPU, so they trade runtime speed for compile speed
(LLVM optimization level 0) and share compiled programs through a persistent compilation cache
that lives for the session.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = tempfile.mkdtemp(prefix="fvdm_jax_test_cache_")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
