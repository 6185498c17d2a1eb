"""When to call jax.distributed.initialize(), following JAX's own cluster detection.

`detect(environ)` names the multi-process environment this process runs in, or None:
  FVDM_DISTRIBUTED=1 / 0   forces either way (1: JAX then finds the coordinator itself).
  slurm     SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS > 1, SLURM_PROCID and SLURM_LOCALID:
            a task of `srun` (a lone python inside a multi-task allocation, without srun, has no
            step node list and stays one process instead of waiting for peers).
  ompi      Open MPI's mpirun (OMPI_MCA_orte_hnp_uri) with OMPI_COMM_WORLD_SIZE > 1.
  tpu       a Cloud TPU VM slice that JAX recognizes (GCE metadata or GKE's TPU_WORKER_HOSTNAMES),
            or TPU_WORKER_HOSTNAMES listing several hosts.
JAX's detectors (jax._src.clusters) are asked first where they exist; the environment checks
above are the fallback and what the tests pin down.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from fvdm_jax.errors import ConfigError

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _int(environ: Mapping[str, str], key: str, default: int = 1) -> int:
    try:
        return int(environ.get(key, default))
    except ValueError:
        return default


def _jax_detected() -> str | None:
    """The cluster JAX's own auto-detection would use (TPU VMs need its metadata query)."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # private API: gone in some jax version -> the environment checks
        return None
    for env in ClusterEnv._cluster_types:
        try:
            if not env.opt_in_only_method and env.is_env_present():
                return env.__name__
        except Exception:  # noqa: BLE001 - a detector that cannot run here does not apply
            continue
    return None


def detect(environ: Mapping[str, str] | None = None, ask_jax: bool = True) -> str | None:
    """'forced' / 'slurm' / 'ompi' / 'tpu', or None for a single process."""
    environ = os.environ if environ is None else environ
    forced = environ.get("FVDM_DISTRIBUTED", "").strip()
    if forced not in ("", "0", "1"):
        raise ConfigError(f"FVDM_DISTRIBUTED={forced!r}: use 1 (multi-process) or 0 (one process)")
    if forced:
        return "forced" if forced == "1" else None
    if all(k in environ for k in SLURM_VARS) and _int(environ, "SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or "," in environ.get("TPU_PROCESS_ADDRESSES", ""):
        return "tpu"
    if ask_jax and environ is os.environ:
        found = _jax_detected()
        if found and "Tpu" in found:  # SLURM / MPI were decided above, with the process count
            return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str | None:
    """Starts jax.distributed where a launch asks for it; returns how it was detected."""
    import jax

    if os.environ.get("JAX_PLATFORMS", "") == "cpu" and (coordinator is not None or detect()):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU rehearsals
    if coordinator is not None:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        how = "flags"
    else:
        how = detect()
        if how is None:
            return None
        jax.distributed.initialize()
    logging.info("jax.distributed (%s): process %d/%d, coordinator %s, %d local devices", how,
                 jax.process_index(), jax.process_count(),
                 coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "auto-detected"),
                 jax.local_device_count())
    return how
