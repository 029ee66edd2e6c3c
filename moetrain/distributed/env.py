"""Start torch.distributed the way DeepSpeed wants it, from any launcher (python, torchrun, deepspeed).

- Plain ``python -m moetrain.train``: we set the single-process env (RANK=0, WORLD_SIZE=1, a free
  MASTER_PORT) so DeepSpeed does not try MPI discovery.
- The ``deepspeed`` launcher passes ``--local_rank=N``: ``strip_launcher_args`` removes it before
  Hydra parses the command line (the env var LOCAL_RANK carries the same value).
- Backend: NCCL on CUDA, gloo on CPU. DeepSpeed's CPU shared-memory collective op is JIT-compiled on
  first use (~2 min); it is disabled unless ``parallel.shm_comm=true`` (see platform notes).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

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


def _set_single_process_env() -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _disable_shm_comm_op() -> None:
    """Keep DeepSpeed on plain gloo: its shm op would be JIT-compiled at the first initialize."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(*, shm_comm: bool = False) -> DistEnv:
    _set_single_process_env()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not shm_comm:
        _disable_shm_comm_op()
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, local_rank, world, device, backend)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        t = t.clone()
        dist.all_reduce(t, group=group)
    return t


def all_reduce_mean(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        return all_reduce_sum(t, group) / dist.get_world_size(group)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
