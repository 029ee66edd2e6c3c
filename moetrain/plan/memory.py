"""Per-rank memory of a training layout: weights, gradients, AdamW state; the launch-time fit check."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from moetrain.config import ConfigError, ModelConfig
from moetrain.plan.fmt import fmt_bytes
from moetrain.plan.params import ACTIVATION_BYTES, BYTES_PER_PARAM, count_params


def check_parallel(
    model_cfg: ModelConfig, *, ep_size: int = 1, dp_size: int = 1, zero_stage: int = 0
) -> None:
    """Raise a one-line :class:`ConfigError` unless the layout is one moetrain can run."""

    def require(ok: bool, name: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{name}={value!r} is invalid: {allowed}")

    require(isinstance(ep_size, int) and ep_size >= 1, "parallel.ep_size", ep_size, "must be >= 1")
    require(zero_stage in (0, 1, 2), "parallel.zero_stage", zero_stage, "one of 0, 1, 2")
    if ep_size > 1:
        require(
            model_cfg.num_experts > 0 and model_cfg.num_experts % ep_size == 0,
            "parallel.ep_size",
            ep_size,
            f"must divide model.num_experts={model_cfg.num_experts}",
        )
    require(
        isinstance(dp_size, int) and not isinstance(dp_size, bool) and dp_size >= 1,
        "plan.dp_size",
        dp_size,
        "must be an integer >= 1",
    )
    require(
        dp_size % ep_size == 0,
        "plan.dp_size",
        dp_size,
        f"must be a multiple of parallel.ep_size={ep_size} (the world is dp_size ranks)",
    )


def resolve_dtype(dtype: str) -> str:
    if dtype in ("fp32", "bf16"):
        return dtype
    if dtype == "fp16":
        return "bf16"  # same byte counts
    if dtype == "auto":  # the trainer's rule: bf16 on CUDA, fp32 on CPU
        try:
            import torch

            return "bf16" if torch.cuda.is_available() else "fp32"
        except ImportError:  # pragma: no cover
            return "fp32"
    raise ConfigError(f"dtype={dtype!r} is invalid: one of auto, fp32, bf16")


def memory_plan(
    model_cfg: ModelConfig, *, ep_size: int = 1, dp_size: int = 1, zero_stage: int = 0, dtype: str = "bf16"
) -> dict[str, Any]:
    """Bytes for weights, gradients and AdamW state: whole model, and on one rank.

    The world is ``dp_size`` ranks. Non-expert params are replicated on every rank; each rank
    holds ``num_experts / ep_size`` experts of every MoE layer. ZeRO-1 partitions optimizer state,
    ZeRO-2 also gradients: non-expert state over ``dp_size`` ranks, expert state over the
    expert-data-parallel group of ``dp_size / ep_size`` ranks. Weights are never partitioned.
    Activations, buffers and fragmentation are not counted.
    """
    check_parallel(model_cfg, ep_size=ep_size, dp_size=dp_size, zero_stage=zero_stage)
    dtype = resolve_dtype(dtype)
    counts = count_params(model_cfg)
    dense_p, expert_p = counts["non_expert_params"], counts["expert_params"]
    local_expert_p = expert_p // ep_size
    edp = dp_size // ep_size
    b = BYTES_PER_PARAM[dtype]

    def shard(n_params: int, nbytes: int, group: int, partitioned: bool) -> int:
        return math.ceil(n_params * nbytes / group) if partitioned else n_params * nbytes

    total = {k: counts["total"] * v for k, v in b.items()}
    total["total"] = sum(total.values())
    per_rank = {
        "weights": (dense_p + local_expert_p) * b["weights"],
        "grads": shard(dense_p, b["grads"], dp_size, zero_stage >= 2)
        + shard(local_expert_p, b["grads"], edp, zero_stage >= 2),
        "optimizer": shard(dense_p, b["optimizer"], dp_size, zero_stage >= 1)
        + shard(local_expert_p, b["optimizer"], edp, zero_stage >= 1),
    }
    per_rank["total"] = sum(per_rank.values())
    return {
        "dtype": dtype,
        "bytes_per_param": dict(b),
        "total": total,
        "per_rank": per_rank,
        "per_rank_params": {
            "non_expert": dense_p,
            "expert": local_expert_p,
            "total": dense_p + local_expert_p,
        },
    }


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


def check_memory_fits(
    model_cfg: ModelConfig,
    *,
    ep_size: int,
    world_size: int,
    zero_stage: int,
    dtype: str,
    available: int,
    machine: str,
) -> None:
    """Raise a one-line :class:`ConfigError` when one rank's training state cannot fit in ``available``.

    The estimate is :func:`memory_plan`'s per-rank weights + gradients + AdamW state (activations
    are extra), so a model this rejects cannot train here; ``machine`` describes ``available``.
    """
    mem = memory_plan(model_cfg, ep_size=ep_size, dp_size=world_size, zero_stage=zero_stage, dtype=dtype)
    need = mem["per_rank"]["total"]
    if need <= available:
        return
    layout = f"ep_size={ep_size}, {world_size} process{'es' if world_size > 1 else ''}, ZeRO-{zero_stage}"
    raise ConfigError(
        f"model {model_cfg.name} needs about {fmt_bytes(need)} per process to train ({mem['dtype']} weights + "
        f"gradients + AdamW state, activations not counted; {layout}) but {machine}: use a smaller model "
        "(e.g. model=mixtral_small), more processes with parallel.ep_size=N to split the experts "
        "(parallel.zero_stage=1|2 also splits optimizer state), or a machine with more memory "
        "(parallel.check_memory=false skips this check)"
    )


def all_to_all_volume(model_cfg: ModelConfig, *, ep_size: int = 1, dtype: str = "bf16") -> dict[str, Any]:
    """Bytes one token sends to other ranks in the expert all-to-all (uniform routing assumed).

    Per MoE layer, forward: dispatch + combine, ``top_k`` copies of a ``hidden_size`` vector each,
    of which ``(ep - 1) / ep`` leave the rank: ``2 * top_k * H * bytes * (ep - 1) / ep``.
    Training doubles it (the backward pass runs both all-to-alls in reverse).
    """
    dtype = resolve_dtype(dtype)
    nbytes = ACTIVATION_BYTES[dtype]
    moe_layers = len(model_cfg.moe_layer_ids)
    remote = (ep_size - 1) / ep_size if moe_layers else 0.0
    fwd = 2 * model_cfg.top_k * model_cfg.hidden_size * nbytes * remote if moe_layers else 0.0
    return {
        "ep_size": ep_size,
        "dtype": dtype,
        "bytes_per_element": nbytes,
        "moe_layers": moe_layers,
        "remote_fraction": remote,
        "per_token_per_layer": {"forward": fwd, "training": 2 * fwd},
        "per_token": {"forward": fwd * moe_layers, "training": 2 * fwd * moe_layers},
    }
