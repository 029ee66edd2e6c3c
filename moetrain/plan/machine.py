"""What this machine can give one training process: a GPU's free memory, or a share of the host's."""

from __future__ import annotations

import os
from pathlib import Path

from moetrain.plan.fmt import fmt_bytes


def _cgroup_available() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers), or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def host_available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable, capped by a cgroup limit)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    cgroup = _cgroup_available()
    return available if cgroup is None else min(available, cgroup)


def machine_memory(local_rank: int = 0, local_world_size: int = 1) -> tuple[int, str] | None:
    """(bytes one training process can use, a phrase describing them), or None when unknown.

    On CUDA: the free memory of this process's GPU. On CPU: the host's available memory shared by
    the ``local_world_size`` processes on this machine.
    """
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(local_rank)
        name = torch.cuda.get_device_name(local_rank)
        return free, f"GPU {local_rank} ({name}) has {fmt_bytes(free)} free"
    available = host_available_memory()
    if available is None:
        return None
    share = available // max(1, local_world_size)
    if local_world_size > 1:
        return share, (
            f"this machine has {fmt_bytes(available)} of memory available, "
            f"{fmt_bytes(share)} for each of its {local_world_size} processes"
        )
    return share, f"this machine has {fmt_bytes(available)} of memory available"
