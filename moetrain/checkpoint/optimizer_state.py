"""A layout-free copy of the AdamW state (ZeRO-0), so a run can resume with another ``ep_size``.

Per parameter name: ``exp_avg`` and ``exp_avg_sq`` with all experts in global order, plus ``step``.
Written by rank 0 beside ``model.safetensors``; on load every rank keeps its expert shard. ZeRO-1/2
keep their state in flat per-rank partitions; resharding those is left to DeepSpeed's universal
checkpoint (documented), and the trainer reinitialises the optimizer with a warning instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.distributed.comm import gather_to_first

FILE = "optimizer_full.pt"


def _name_of(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def save_full_optimizer_state(model: nn.Module, optimizer: Any, folder: Path, rank: int, ep: Any) -> None:
    """Collective under expert parallelism. ``optimizer`` must be a plain torch optimizer (ZeRO-0 fp32)."""
    names = _name_of(model)
    full: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            entry = {"step": float(st["step"])}
            for key in ("exp_avg", "exp_avg_sq"):
                t = st[key].detach()
                if ep.enabled and getattr(p, "allreduce", True) is False:
                    if 0 not in dist.get_process_group_ranks(ep.group):
                        continue  # a replica group: rank 0's group writes these experts
                    t = gather_to_first(t, ep.group, out_device="cpu")  # streamed to rank 0's host
                    if t is None:
                        continue
                entry[key] = t.cpu().clone()
            full[names[id(p)]] = entry
    if rank == 0:
        torch.save(full, folder / FILE)


def load_full_optimizer_state(model: nn.Module, optimizer: Any, folder: Path, ep: Any) -> bool:
    """Fill a freshly built torch optimizer from the layout-free file; False if there is none."""
    path = folder / FILE
    if (
        not path.is_file()
        or not hasattr(optimizer, "state")
        or type(optimizer).__module__.startswith("deepspeed")
    ):
        return False
    full = torch.load(path, map_location="cpu", weights_only=False)
    names = _name_of(model)
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = full.get(names[id(p)])
            if entry is None:
                continue
            state = {"step": torch.tensor(entry["step"])}
            for key in ("exp_avg", "exp_avg_sq"):
                t = entry[key]
                if ep.enabled and getattr(p, "allreduce", True) is False:
                    El = t.shape[0] // ep.ep_size
                    t = t[ep.ep_rank * El : (ep.ep_rank + 1) * El]
                state[key] = t.to(device=p.device, dtype=p.dtype).clone()
            optimizer.state[p] = state
    return True
