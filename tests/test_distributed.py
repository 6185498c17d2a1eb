"""When a process starts jax.distributed (fvdm_jax/runtime/distributed.py): the environments JAX itself
recognizes, and FVDM_DISTRIBUTED to force either way."""

import pytest

from fvdm_jax.errors import ConfigError
from fvdm_jax.runtime.distributed import SLURM_VARS, detect

SRUN_TASK = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16",
             "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}


@pytest.mark.parametrize("environ, want", [
    ({}, None),
    (SRUN_TASK, "slurm"),
    ({**SRUN_TASK, "SLURM_NTASKS": "1"}, None),  # one task: nothing to join
    # python run directly inside a 16-task allocation (no srun step): one process, no waiting
    ({k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_NODELIST"}, None),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4"}, None),
    ({"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    ({"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"FVDM_DISTRIBUTED": "1"}, "forced"),
    ({**SRUN_TASK, "FVDM_DISTRIBUTED": "0"}, None),
])
def test_detection(environ, want):
    assert detect(environ) == want


def test_slurm_needs_every_variable_jax_reads():
    for missing in SLURM_VARS:
        environ = {k: v for k, v in SRUN_TASK.items() if k != missing}
        assert detect(environ) is None, missing


def test_bad_forcing_value_is_one_line():
    with pytest.raises(ConfigError, match="FVDM_DISTRIBUTED='yes'"):
        detect({"FVDM_DISTRIBUTED": "yes"})


def test_a_plain_machine_is_one_process_also_for_jax_detectors(monkeypatch):
    for key in (*SLURM_VARS, "FVDM_DISTRIBUTED", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(key, raising=False)
    assert detect() is None  # os.environ itself: JAX's own detectors are asked too
