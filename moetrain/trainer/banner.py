"""The lines a run prints before its first step (rank 0): model, layout, plan, data, kernels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig
from moetrain.distributed import DistEnv
from moetrain.trainer.engine import slow_dtype_warning


def moe_kernel_summary(layer: Any, device: torch.device, dtype: torch.dtype) -> str:
    """Backend and expert GEMM for this device and dtype: what the first forward will run."""
    where = (
        "cpu"
        if device.type == "cpu"
        else f"{torch.cuda.get_device_name(device)} sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    )
    dt = str(dtype).replace("torch.", "")
    if layer.moe_backend == "megablocks":
        gemm = (
            "grouped_gemm.gmm"
            if device.type == "cuda" and dtype == torch.bfloat16
            else "torch matmuls (grouped_gemm is CUDA bf16 only)"
        )
        return f"megablocks permutation + {gemm} ({where}, {dt})"
    impl = layer.experts.resolved_impl(dtype)
    why = {
        "grouped_mm": "torch.nn.functional.grouped_mm",
        "loop": "per-expert matmul loop"
        + (" (this torch has no grouped_mm)" if not hasattr(torch.nn.functional, "grouped_mm") else ""),
    }.get(impl, impl)
    block = layer.experts.resolved_row_block(device, dtype)
    rows = f", rows per expert padded to a multiple of {block}" if block > 1 else ""
    return f"torch dispatch + {why}{rows} ({where}, {dt}; model.moe.expert_impl={layer.experts.impl})"


def print_banner(
    c: TrainConfig,
    env: DistEnv,
    data: Any,
    model: Any,
    dtype: torch.dtype,
    run_dir: Path,
    log: Callable[[str], None],
) -> None:
    """Rank 0 only; ``log`` also keeps the line in train.log (the slow-dtype warning)."""
    from moetrain.plan import count_params, plan_summary

    if not env.is_main:
        return
    counts = count_params(c.model)
    print(
        f"moetrain: {c.model.name} | {counts['total'] / 1e6:.2f}M total params, "
        f"{counts['active'] / 1e6:.2f}M active per token | world {env.world_size} "
        f"(ep {c.parallel.ep_size}, ZeRO-{c.parallel.zero_stage}, {env.backend}, {dtype}) | run dir {run_dir}",
        flush=True,
    )
    warning = slow_dtype_warning(env.device, dtype)
    if warning:  # printed and kept in train.log
        log("  " + warning)
    from moetrain.pretrained import pretrained_summary

    if pretrained_summary(c.model):
        print("  " + pretrained_summary(c.model), flush=True)
    for line in plan_summary(
        c.model,
        ep_size=c.parallel.ep_size,
        dp_size=env.world_size,
        zero_stage=c.parallel.zero_stage,
        dtype="bf16" if dtype == torch.bfloat16 else "fp32",
        seq_len=c.data.seq_len,
    ):
        print("  " + line, flush=True)
    stats = data.stats
    print(
        f"  data: {c.data.name} | {len(data.train)} train blocks x {c.data.seq_len + 1} tokens, "
        f"{len(data.validation)} validation blocks | global batch "
        f"{c.optim.micro_batch_size * c.optim.grad_accum * env.world_size} sequences"
        + (f" | {stats['tokens']} tokens" if "tokens" in stats else ""),
        flush=True,
    )
    if data.is_mixture:
        parts = [
            f"{d} {w:.3f} ({len(t)} blocks)"
            for d, w, t in zip(data.domains, data.weights, data.train_sources)
        ]
        print(f"  mixture: {', '.join(parts)} | data.on_exhausted={c.data.on_exhausted}", flush=True)
    if c.data.document_masking:
        print("  document masking: attention inside each document, positions restart", flush=True)
    if c.parallel.compile:
        print(
            "  compile: each block through torch.compile (inductor), experts and token exchange "
            "eager; the first training and evaluation steps compile",
            flush=True,
        )
    if model.moe_layers:  # which kernels this run's MoE layers use, and why (logged once)
        print("  moe kernels: " + moe_kernel_summary(model.moe_layers[0], env.device, dtype), flush=True)
