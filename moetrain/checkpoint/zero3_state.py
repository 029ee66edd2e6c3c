"""Reading and writing DeepSpeed ZeRO-3 partitions (offloaded or not) for the layout-free checkpoints.

At ZeRO-3 a parameter's ``data`` is empty outside the forward; each rank holds ``ds_tensor`` (its
partition of the model-dtype weight, padded to ``ceil(numel / group)``) and the optimizer holds the
matching fp32 master and AdamW state partitions, in host memory with ``offload_optimizer``. The
partition group is the parameter's ZeRO group: all ranks, or an expert's expert-data-parallel group.

Reading goes through DeepSpeed's ``safe_get_full_*`` (an all-gather over that group: collective).
Writing does not use ``safe_set_full_*``: in DeepSpeed 0.19.8 it slices the full value at
``rank * partition`` for the partition's padded length, which runs past the end on the last rank
whenever ``numel`` is not a multiple of the group size. Each rank instead writes its own padded slice
(``safe_set_local_*``) and, for the master weight, the model-dtype partition the forward gathers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_zero3_optimizer(optimizer: Any) -> bool:
    return hasattr(optimizer, "fp32_partitioned_groups_flat") and hasattr(optimizer, "get_full_hp_param")


def _local_slice(p: nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full ``value`` of ``p``, zero-padded to the partition's length."""
    rank = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else 0
    return partition_slice(value, p.ds_tensor.numel(), rank)


def partition_slice(value: torch.Tensor, n: int, rank: int) -> torch.Tensor:
    """Elements ``[rank * n, (rank + 1) * n)`` of ``value`` flattened, zero-padded to ``n`` (a ZeRO-3
    partition of ``n`` elements: the last rank's runs past the end when the size is not a multiple)."""
    flat = value.reshape(-1)
    part = flat[rank * n : min((rank + 1) * n, flat.numel())]
    if part.numel() == n:
        return part
    out = torch.zeros(n, dtype=value.dtype, device=value.device)
    out[: part.numel()] = part
    return out


def get_master(p: nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p)


def get_state(p: nn.Parameter, key: str) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    return safe_get_full_optimizer_state(p, key)


def prepare_state(optimizer: Any, keys: list[str], step: float) -> None:
    """Zeroed optimizer state for every fp32 partition (as the first step would create it). At ZeRO-3
    the torch optimizer's param groups are empty between steps: DeepSpeed puts each sub-group's flat
    fp32 partition in for its step only, so the partitions are listed here from DeepSpeed's side."""
    base = optimizer.optimizer
    for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat):
        group = base.param_groups[optimizer.sub_group_to_group_id[i]]
        on_device = group.get("fused") or group.get("capturable")
        st: dict[str, Any] = {k: torch.zeros_like(flat) for k in keys}
        st["step"] = torch.tensor(step, dtype=torch.float32, device=flat.device if on_device else "cpu")
        base.state[flat] = st


@torch.no_grad()
def set_master(p: nn.Parameter, value: torch.Tensor) -> None:
    """The fp32 master partition and the model-dtype partition (what the next forward gathers)."""
    from deepspeed.utils import safe_set_local_fp32_param

    local = _local_slice(p, value.to(torch.float32))
    safe_set_local_fp32_param(p, local.to(p.ds_tensor.device))
    p.ds_tensor.data.copy_(local.to(p.ds_tensor.dtype).view_as(p.ds_tensor))
    if p.numel() == p.ds_numel:  # kept gathered (a persistent small parameter): its full copy too
        p.data.copy_(value.view(p.ds_shape).to(p.dtype))


@torch.no_grad()
def set_state(p: nn.Parameter, key: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_local_optimizer_state

    local = _local_slice(p, value.to(torch.float32))
    safe_set_local_optimizer_state(p, local, key)


def load_module_buffers(model: nn.Module, path: Path, ep: Any) -> dict[str, torch.Tensor]:
    """Read a layout-free ``model.safetensors`` (this rank's experts only) and load its buffers into
    the module; the parameters are returned for :func:`set_master` (their ``data`` is partitioned)."""
    from moetrain.checkpoint.legacy_format import read_layout_free

    sd = read_layout_free(path, model, ep)
    buffers = {name for name, _ in model.named_buffers()} & set(model.state_dict())  # persistent ones
    missing = sorted(buffers - set(sd))
    if missing:
        raise KeyError(f"{path} lacks buffers {missing}")
    model.load_state_dict({k: v for k, v in sd.items() if k in buffers}, strict=False)
    return sd
