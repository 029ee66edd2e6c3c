"""Start torch.distributed the way DeepSpeed wants it, from any launcher (python, torchrun, deepspeed).

- Plain ``python -m moetrain.train``: we set the single-process env (RANK=0, WORLD_SIZE=1, a free
  MASTER_PORT) so DeepSpeed does not try MPI discovery.
- The ``deepspeed`` launcher passes ``--local_rank=N``: ``strip_launcher_args`` removes it before
  Hydra parses the command line (the env var LOCAL_RANK carries the same value).
- Backend: NCCL on CUDA, gloo on CPU. DeepSpeed's CPU shared-memory collective op is JIT-compiled on
  first use (~2 min); it is disabled unless ``parallel.shm_comm=true`` (see docs/EXPERT_PARALLEL.md).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (deepspeed launcher), exporting LOCAL_RANK."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(arg)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (rank, world size, local rank, local world size) variables of each launcher, in order of trust.
# torchrun and the deepspeed launcher (pdsh / local) set the torch names; MPI launchers and srun set
# their own and start Python without them (DeepSpeed's openmpi/mvapich/slurm runners included).
LAUNCHER_VARS: dict[str, tuple[str, str, str, str]] = {
    "torch": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "openmpi": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "mvapich": (
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    # SLURM_STEP_NUM_TASKS exists only inside an srun step (a batch script has SLURM_NTASKS of the
    # whole allocation but is one process), so a plain `python` in an sbatch script stays 1 process.
    "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
}


class LaunchError(RuntimeError):
    """The launcher's environment is incomplete (one line, naming the variable and the fix)."""


def discover_launch_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) this process should use, derived from whichever launcher started it.

    Pure: reads ``environ`` (default ``os.environ``) and returns what to set; ``init_distributed``
    applies it. A plain ``python`` start becomes rank 0 of 1 on a free local port."""
    env = dict(os.environ if environ is None else environ)
    for launcher, (rk, ws, lr, lws) in LAUNCHER_VARS.items():
        if rk in env and ws in env:
            world = int(env[ws])
            local_world = env.get(lws, "")
            # SLURM_STEP_TASKS_PER_NODE looks like "4(x2)" or "4,2": this node's count comes first.
            local_world = re.match(r"\d+", local_world).group(0) if re.match(r"\d+", local_world) else None
            out = {
                "RANK": str(int(env[rk])),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(int(env.get(lr, "0") or 0)),
                "LOCAL_WORLD_SIZE": local_world or ("1" if world == 1 else env.get("LOCAL_WORLD_SIZE", "")),
            }
            if not out["LOCAL_WORLD_SIZE"]:
                out.pop("LOCAL_WORLD_SIZE")
            master = env.get("MASTER_ADDR")
            if master is None and world > 1:
                raise LaunchError(
                    f"started by {launcher} with {world} processes but MASTER_ADDR is not set; fix: export "
                    "MASTER_ADDR=<first node's address> (and MASTER_PORT) to every process, as "
                    "scripts/train_multinode.sh does"
                )
            out["MASTER_ADDR"] = master or "127.0.0.1"
            out["MASTER_PORT"] = env.get("MASTER_PORT") or ("29500" if world > 1 else str(_free_port()))
            return out
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT") or str(_free_port()),
    }


def init_distributed(*, shm_comm: bool = False) -> DistEnv:
    os.environ.update(discover_launch_env())
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not shm_comm:
        from moetrain.distributed.deepspeed_patches import disable_shm_comm_op

        disable_shm_comm_op()
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        # Before the process group: NCCL binds each rank's communicator to the current device.
        visible = torch.cuda.device_count()
        if local_rank < visible:
            index = local_rank
        elif visible == 1:  # srun --gpus-per-task=1 / --gpu-bind: each task sees only its own GPU
            index = 0
        else:
            raise LaunchError(
                f"LOCAL_RANK={local_rank} but this process sees {visible} CUDA device(s); fix: start "
                "at most that many processes per node, or give each process its own GPU"
            )
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, local_rank, world, device, backend)


def shutdown_distributed() -> None:
    """Destroy the process groups (if any) while the interpreter is still whole.

    torch asks every program to call ``destroy_process_group`` before it exits: it finalizes NCCL
    communicators (NCCL warns otherwise) and is local to each rank, no collective. It does not stop
    gloo's worker threads while other references to the groups remain (DeepSpeed keeps some); that the
    process never finalizes with those threads alive is ``moetrain.cli.run_then_exit``'s job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
