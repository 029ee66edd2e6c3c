"""Every collective the trainer issues, in one place, on the right device.

NCCL only takes CUDA tensors; gloo takes CPU tensors. Bookkeeping tensors (loss sums, routing counts,
norms, eval totals) are naturally built wherever is convenient, so each helper here moves its input
to the group's *communication device* (``comm_device``), runs the collective, and hands the result
back on the caller's device. Nothing outside ``moetrain/distributed/`` calls ``torch.distributed``
collectives directly (``tests/distributed/test_comm.py`` checks the source tree), except the
router's global-batch counts in ``moe/losses.py``, which are built on the model's device already.

The helpers run the collective whenever a process group exists, also with one process: a single-GPU
NCCL run then exercises the same device placement as a multi-node one (a CPU tensor fails at once).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def comm_device(group: Any = None) -> torch.device:
    """Where tensors must live for collectives on ``group``: CUDA for NCCL, CPU otherwise."""
    if not initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size(group: Any = None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def _on_comm(t: torch.Tensor, group: Any) -> torch.Tensor:
    """A contiguous copy on the communication device (always a copy: collectives work in place)."""
    return t.detach().to(comm_device(group), copy=True).contiguous()


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: Any) -> torch.Tensor:
    if not initialized():
        return t
    buf = _on_comm(t, group)
    dist.all_reduce(buf, op=op, group=group)
    return buf.to(t.device)


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM, group)


def all_reduce_mean(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    return all_reduce_sum(t, group) / world_size(group)


def all_reduce_max(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX, group)


def any_rank(flag: bool, group: Any = None) -> bool:
    """True on every rank if it is true on any rank: one small collective, so all ranks agree
    (used for stop requests and numeric faults, where ranks must take the same branch)."""
    if not initialized():
        return bool(flag)
    return bool(all_reduce_max(torch.tensor([1.0 if flag else 0.0]), group).item() > 0)


def barrier(group: Any = None) -> None:
    if initialized():
        if comm_device(group).type == "cuda":  # NCCL's barrier must know the device of this rank
            dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    if not initialized() or world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=comm_device(group))
    return box[0]


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's small picklable ``obj`` (messages, digests), on every rank, in rank order."""
    if not initialized() or world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_to_first(
    t: torch.Tensor, group: Any, out_device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """Concatenate every group member's ``t`` (same shape) along dim 0 on the group's first rank,
    on ``out_device`` (the host by default, where checkpoints are written); None elsewhere.

    One tensor at a time and point-to-point, so the peak is one gathered tensor on one rank, not
    every expert of the model on every rank (which ``all_gather`` of the whole state would cost)."""
    if not initialized() or world_size(group) == 1:
        return t.detach().to(out_device, copy=True)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    me, first = dist.get_rank(), ranks[0]
    buf = _on_comm(t, group)
    if me != first:
        dist.send(buf, dst=first, group=group)
        return None
    parts = [buf.to(out_device)]
    for src in ranks[1:]:
        recv = torch.empty_like(buf)
        dist.recv(recv, src=src, group=group)
        parts.append(recv.to(out_device))
    return torch.cat(parts, 0)
