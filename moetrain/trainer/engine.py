"""Build the DeepSpeed engine from the typed config (the DeepSpeed JSON is generated, not hand-written).

A user JSON (``parallel.deepspeed_config``) is merged over the generated one, so any DeepSpeed option
stays reachable; the batch-size keys are always ours, since the data loader depends on them.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig, training_dtype
from moetrain.distributed.deepspeed_patches import (
    install_lean_bf16_step,
    reduce_groups_of_one_per_gradient,
    share_fp32_zero3_masters,
    skip_single_rank_allreduce,
)
from moetrain.moe.experts import onednn_runs_cpu_gemm
from moetrain.trainer.schedule import lr_multiplier


def resolve_dtype(name: str) -> torch.dtype:
    """``parallel.dtype`` as a torch dtype, by the rule plan uses too (config.training_dtype)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[training_dtype(name)]


def slow_dtype_warning(device: torch.device, dtype: torch.dtype) -> str | None:
    """One line for the run's banner when this device runs ``dtype``'s GEMMs in a slow fallback: bf16
    on a CPU without bf16 instructions (an AVX2-only x86 CPU) goes through torch's own kernel, about
    96-168x slower than fp32 there (benchmarks/results/layer_and_step_epyc-avx2_2026-12-02.md). A
    warning, not an error: bf16 numerics on such a CPU are still right, only slow."""
    if device.type != "cpu" or dtype != torch.bfloat16 or onednn_runs_cpu_gemm(dtype):
        return None  # parallel.dtype offers fp32 and bf16 only
    return (
        "warning: parallel.dtype=bf16 on a CPU without bf16 GEMM instructions "
        f"(torch CPU capability {torch.backends.cpu.get_cpu_capability()}): its matmuls run in torch's "
        "fallback kernel, two orders of magnitude slower than fp32; use parallel.dtype=fp32 here"
    )


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fused_adamw_supported(device: torch.device | str) -> bool:
    """torch's fused AdamW (one kernel per parameter instead of ~10 elementwise passes; 4x faster
    on a 2-core CPU for mixtral_small) exists for CPU since torch 2.4 and for CUDA; older builds or
    other devices refuse it at construction."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def deepspeed_config(
    cfg: TrainConfig, dp_world_size: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    o, p = cfg.optim, cfg.parallel
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": o.micro_batch_size * o.grad_accum * dp_world_size,
        # ZeRO-0: the loop clips with the exact global norm (DeepSpeed's fp32 path averages per-rank
        # norms, which is not the global norm once experts are sharded). ZeRO-1/2: DeepSpeed clips.
        "gradient_clipping": o.grad_clip if p.zero_stage > 0 else 0.0,
        "zero_optimization": zero_config(
            p.zero_stage, p.offload_optimizer, device, cfg.model.hidden_size, p.overlap_comm
        ),
        "bf16": {"enabled": resolve_dtype(p.dtype) == torch.bfloat16},
        # Gradients are summed across ranks in fp32 by default even in bf16 runs (DeepSpeed's default
        # would reduce in the model dtype: 8 mantissa bits for a sum over every data-parallel rank);
        # parallel.grad_reduce_dtype=bf16 halves the bytes instead.
        "communication_data_type": p.grad_reduce_dtype,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: the torch implementation; DeepSpeed's fused Adam would JIT-compile on CPU.
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
                # DeepSpeed passes this through to torch.optim.AdamW (the default is the per-tensor loop).
                **({"fused": True} if fused_adamw_supported(device) else {}),
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.deepspeed_config:
        path = Path(p.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"parallel.deepspeed_config={p.deepspeed_config!r}: no such file")
        user = json.loads(path.read_text())
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            user.pop(key, None)
        ds = _merge(ds, user)
    return ds


def zero_config(
    stage: int,
    offload_optimizer: bool,
    device: torch.device | str,
    hidden_size: int,
    overlap_comm: bool | None = None,
) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization`` block. Offload: the fp32 masters and AdamW state live in host
    memory and the step runs there, with the same torch AdamW (``torch_adam``) as without offload:
    DeepSpeedCPUAdam would JIT-compile an op first (docs/EXPERT_PARALLEL.md has the timings).

    ZeRO-3 buffers follow the model (the sizes transformers' DeepSpeed integration derives from the
    hidden size) instead of DeepSpeed's fixed defaults (5e8-element reduce bucket, 5e7 prefetch):
    those buffers, and weights kept gathered between uses, outweighed the partitioned state of a
    small model. Parameters below 10 x
    hidden elements (norms) stay gathered; everything else is partitioned, as plan counts it."""
    out: dict[str, Any] = {"stage": stage}
    if overlap_comm is not None:  # parallel.overlap_comm; null leaves DeepSpeed's default
        out["overlap_comm"] = overlap_comm
    if stage == 3:
        out.update(
            reduce_bucket_size=hidden_size * hidden_size,
            stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
            stage3_param_persistence_threshold=10 * hidden_size,
            # release gathered weights after use (DeepSpeed's 1e9 defaults keep the whole model gathered)
            stage3_max_live_parameters=4 * hidden_size * hidden_size,
            stage3_max_reuse_distance=4 * hidden_size * hidden_size,
        )
    if offload_optimizer:
        # pinned host buffers speed up the GPU <-> host copies; on a CPU run there is nothing to copy
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.device(device).type == "cuda"}
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms and biases (1-D params, the experts' [E, n] biases); decay on matrices,
    embeddings and experts."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            dims = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter's data is empty
            (decay if dims >= 2 and not name.endswith("_bias") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_engine(model: torch.nn.Module, cfg: TrainConfig, dp_world_size: int):
    import deepspeed

    device = next(model.parameters()).device
    ds_config = deepspeed_config(cfg, dp_world_size, device)
    # Under expert parallelism the engine splits these groups into dense / expert (moe) groups itself.
    groups = param_groups(model, cfg.optim.weight_decay)
    schedule = partial(
        lr_multiplier,
        warmup_steps=cfg.optim.warmup_steps,
        max_steps=cfg.trainer.max_steps,
        min_lr_ratio=cfg.optim.min_lr_ratio,
    )

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    if cfg.parallel.zero_stage == 3:
        share_fp32_zero3_masters()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds_config, lr_scheduler=make_scheduler
    )
    if dp_world_size == 1 and cfg.parallel.zero_stage == 0:  # a reduction over a group of one
        skip_single_rank_allreduce(engine)
    if cfg.parallel.zero_stage == 0:  # ep_size = world size: expert gradients "reduced" over one rank
        reduce_groups_of_one_per_gradient(engine)
    if cfg.parallel.zero_stage == 0:  # bf16: DeepSpeed's step minus passes the loop already did
        install_lean_bf16_step(engine.optimizer)
    return engine, optimizer, scheduler, ds_config
