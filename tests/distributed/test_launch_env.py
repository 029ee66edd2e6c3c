"""Rank discovery from each launcher's environment (torchrun, deepspeed, OpenMPI, MVAPICH, MPICH, srun)."""

from __future__ import annotations

import pytest

from moetrain.distributed.env import LaunchError, discover_launch_env

MASTER = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511"}


@pytest.mark.parametrize(
    ("name", "environ", "expected"),
    [
        (
            "torchrun",
            {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", **MASTER},
            ("5", "8", "1", "4"),
        ),
        (
            "openmpi",
            {
                "OMPI_COMM_WORLD_RANK": "6",
                "OMPI_COMM_WORLD_SIZE": "16",
                "OMPI_COMM_WORLD_LOCAL_RANK": "6",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
                **MASTER,
            },
            ("6", "16", "6", "8"),
        ),
        (
            "mvapich",
            {
                "MV2_COMM_WORLD_RANK": "3",
                "MV2_COMM_WORLD_SIZE": "4",
                "MV2_COMM_WORLD_LOCAL_RANK": "1",
                "MV2_COMM_WORLD_LOCAL_SIZE": "2",
                **MASTER,
            },
            ("3", "4", "1", "2"),
        ),
        (
            "mpich",
            {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2", **MASTER},
            ("2", "4", "0", "2"),
        ),
        (
            "srun",
            {
                "SLURM_PROCID": "9",
                "SLURM_STEP_NUM_TASKS": "16",
                "SLURM_LOCALID": "1",
                "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
                "SLURM_NTASKS": "16",
                **MASTER,
            },
            ("9", "16", "1", "8"),
        ),
    ],
)
def test_each_launcher(name, environ, expected):
    out = discover_launch_env(environ)
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["LOCAL_WORLD_SIZE"]) == expected, name
    assert (out["MASTER_ADDR"], out["MASTER_PORT"]) == ("10.0.0.1", "29511")


def test_plain_python_is_rank_0_of_1():
    out = discover_launch_env({})
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"]) == ("0", "1", "0")
    assert out["MASTER_ADDR"] == "127.0.0.1" and int(out["MASTER_PORT"]) > 0


def test_sbatch_script_without_srun_is_one_process():
    """A batch script sees SLURM_NTASKS of the whole allocation but is a single process."""
    out = discover_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "42"})
    assert out["WORLD_SIZE"] == "1"


def test_torch_variables_win_over_mpi_ones():
    """torchrun inside an MPI or Slurm allocation: the torch variables describe this process."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", **MASTER}
    assert discover_launch_env(env)["RANK"] == "1"


def test_multi_process_without_master_addr_is_one_line():
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set") as e:
        discover_launch_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"})
    assert "\n" not in str(e.value) and "openmpi" in str(e.value)


def _shutdown_worker(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    from moetrain.distributed import shutdown_distributed

    dist.init_process_group("gloo")
    out = [torch.empty(1) for _ in range(world)]
    dist.all_gather(out, torch.tensor([float(rank)]))  # gloo's worker threads have run
    shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # no group: nothing to do


@pytest.mark.multiprocess
def test_shutdown_distributed_destroys_the_group_on_every_rank() -> None:
    from moetrain.testing import run_distributed

    run_distributed(_shutdown_worker, 3)
