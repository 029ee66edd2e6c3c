"""How big a checkpoint will be, before any is written (the launch check and ``moetrain.plan``).

A checkpoint holds per parameter its fp32 master weight and AdamW's two fp32 moments (12 bytes),
plus a few KB of config, tokenizer, rank states and manifest (counted as a flat margin). Per rank:
each expert is written by one rank of its expert-parallel group and the non-expert tensors fill up
the other ranks (checkpoint/layout.py), so the busiest writer holds about
``max(total / world, experts / ep_size)``.
"""

from __future__ import annotations

import math
from typing import Any

BYTES_PER_PARAM = 12  # fp32 master + exp_avg + exp_avg_sq
OVERHEAD = 256 * 1024  # config, tokenizer, trainer/rank state, index and manifest files


def checkpoint_bytes(model_cfg: Any, *, ep_size: int = 1, world_size: int = 1) -> dict[str, int]:
    from moetrain.plan import count_params

    counts = count_params(model_cfg)
    total = counts["total"] * BYTES_PER_PARAM + OVERHEAD
    experts = counts["expert_params"] * BYTES_PER_PARAM
    per_rank = max(math.ceil(total / world_size), math.ceil(experts / max(ep_size, 1)))
    return {"total": total, "per_rank": min(per_rank, total)}


def write_seconds(sizes: dict[str, int], *, world_size: int, ranks_per_node: int, disk_gbps: float) -> float:
    """Time to write one checkpoint at ``disk_gbps`` GB/s per node, every node writing its ranks'
    shares at once."""
    per_node = min(ranks_per_node, world_size) * sizes["per_rank"]
    return min(per_node, sizes["total"]) / (disk_gbps * 1e9)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
