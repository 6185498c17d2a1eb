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

`initialize` also sets what happens when a process dies or is signalled (docs/training.md):
  FVDM_PEER_TIMEOUT_S (default 60)  a process whose heartbeat stops this long ends the others
            with one line and exit 75 (fvdm_jax.training.preemption.PeerWatch); JAX's own
            heartbeat timeout, whose expiry aborts every process from C++ (exit 134, a stack
            dump), is set 40 s later so that the clean exit comes first.
  JAX's preemption service is turned off: its C++ SIGTERM handler would swallow a SIGTERM that
            arrives before training installs its own (the process would run on, unaware), and the
            training loop agrees on the stop step itself (fvdm_jax.training.preemption).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping

from fvdm_jax.errors import ConfigError

HEARTBEAT_MARGIN_S = 40  # JAX's heartbeat timeout = FVDM_PEER_TIMEOUT_S + this
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _int(environ: Mapping[str, str], key: str, default: int = 1) -> int:
    try:
        return int(environ.get(key, default))
    except ValueError:
        return default


def peer_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """FVDM_PEER_TIMEOUT_S: seconds without a heartbeat after which a process counts as dead."""
    environ = os.environ if environ is None else environ
    text = environ.get("FVDM_PEER_TIMEOUT_S", "").strip() or "60"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"FVDM_PEER_TIMEOUT_S={text!r}: give a number of seconds > 0 (default 60)")
    return value


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

    how = "flags" if coordinator is not None else detect()
    if how is None:
        return None
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU rehearsals
    jax.config.update("jax_enable_preemption_service", False)  # see the module docstring
    options = {}
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        options["heartbeat_timeout_seconds"] = int(peer_timeout_s() + HEARTBEAT_MARGIN_S)
    if coordinator is not None:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **options)
    else:
        jax.distributed.initialize(**options)
    logging.info("jax.distributed (%s): process %d/%d, coordinator %s, %d local devices", how,
                 jax.process_index(), jax.process_count(),
                 coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "auto-detected"),
                 jax.local_device_count())
    return how
