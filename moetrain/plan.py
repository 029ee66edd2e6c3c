"""MoE economics: parameters, FLOPs, memory and all-to-all traffic of a model config, before training.

    python -m moetrain.plan model=mixtral_8x7b parallel.ep_size=8 [plan.dp_size=16] [plan.format=json]

Everything here is arithmetic on a :class:`~moetrain.config.ModelConfig`; nothing builds a model or
imports torch. Formulas and assumptions are in ``docs/PLAN.md``. The pure functions
(:func:`count_params`, :func:`flops_per_token`, :func:`memory_plan`, :func:`all_to_all_volume`,
:func:`build_plan`, :func:`plan_summary`) are the API; :func:`main` is the Hydra CLI.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from moetrain.config import ConfigError, ModelConfig

# Bytes per parameter for weights, gradients and AdamW state (two moments, plus an fp32 master
# copy of the weights when the weights themselves are 16-bit): the usual mixed-precision model.
BYTES_PER_PARAM: dict[str, dict[str, int]] = {
    "fp32": {"weights": 4, "grads": 4, "optimizer": 8},
    "bf16": {"weights": 2, "grads": 2, "optimizer": 12},
}
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2}
COMPONENTS = (
    "embedding",
    "lm_head",
    "attention",
    "norms",
    "router",
    "experts",
    "shared_expert",
    "dense_ffn",
)


# ----------------------------------------------------------------------------------------------
# parameters


def _mla_params(cfg: ModelConfig) -> int:
    """Multi-head latent attention (moetrain/model/mla.py), its two latent norms included."""
    m, h, n = cfg.mla, cfg.hidden_size, cfg.num_heads
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    q = h * n * qk if m.q_lora_rank is None else h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * n * qk
    kv = (
        h * (m.kv_lora_rank + m.qk_rope_head_dim)
        + m.kv_lora_rank
        + m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)
    )
    return q + kv + n * m.v_head_dim * h


def _attention_params(cfg: ModelConfig) -> int:
    if cfg.mla.enabled:
        return _mla_params(cfg)
    h, hd = cfg.hidden_size, cfg.head_size
    q = h * cfg.num_heads * hd
    kv = 2 * h * cfg.num_kv_heads * hd
    o = cfg.num_heads * hd * h
    bias = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd if cfg.attention_bias else 0
    bias += h if cfg.attention_out_bias else 0  # gpt-oss
    sinks = cfg.num_heads if cfg.attention_sinks else 0
    return q + kv + o + bias + sinks


def _qk_norm_params(cfg: ModelConfig) -> int:
    """Per layer: OLMoE normalises the whole q / k projections, Qwen3 each head (one shared weight)."""
    if cfg.qk_norm == "full":
        return (cfg.num_heads + cfg.num_kv_heads) * cfg.head_size
    if cfg.qk_norm == "per_head":
        return 2 * cfg.head_size
    return 0


def count_params(model_cfg: ModelConfig) -> dict[str, Any]:
    """Parameter counts of the moetrain decoder built from ``model_cfg`` (exact).

    Attention includes its q/k/v biases (``attention_bias``); norms include QK-norm weights; the
    shared expert (and its gate) is active for every token. Returns ``{"total", "active", "total_breakdown", "active_breakdown", "expert_params",
    "non_expert_params", "moe_layers", "dense_layers"}``. ``total`` equals
    ``sum(p.numel() for p in model.parameters())`` (a tied LM head is counted once, as
    ``embedding``); ``active`` counts only ``top_k`` experts per MoE layer (Mixtral convention).
    Breakdown keys: embedding, lm_head, attention, norms, router, experts, shared_expert, dense_ffn.
    """
    cfg = model_cfg
    h, v = cfg.hidden_size, cfg.vocab_size
    moe_layers = len(cfg.moe_layer_ids)
    dense_layers = cfg.num_layers - moe_layers
    per_expert = 3 * h * cfg.ffn_hidden_size
    if cfg.moe.expert_proj_bias:  # gpt-oss: gate, up [F] and down [H] biases
        per_expert += 2 * cfg.ffn_hidden_size + h

    shared = {
        "embedding": v * h,
        "lm_head": 0 if cfg.tie_embeddings else v * h,
        "attention": cfg.num_layers * _attention_params(cfg),
        # attention_norm + ffn_norm (+ QK-norm) per layer, final norm
        "norms": (2 * cfg.num_layers + 1) * h + cfg.num_layers * _qk_norm_params(cfg),
        "router": moe_layers * (h + (1 if cfg.moe.router_bias else 0)) * cfg.num_experts,
        "shared_expert": moe_layers
        * (3 * h * cfg.shared_expert_intermediate_size + (h if cfg.shared_expert_gate else 0)),
        "dense_ffn": dense_layers * 3 * h * cfg.dense_ffn_size,
    }
    total_breakdown = {k: shared.get(k, 0) for k in COMPONENTS}
    active_breakdown = dict(total_breakdown)
    total_breakdown["experts"] = moe_layers * cfg.num_experts * per_expert
    active_breakdown["experts"] = moe_layers * cfg.top_k * per_expert if moe_layers else 0
    total = sum(total_breakdown.values())
    active = sum(active_breakdown.values())
    return {
        "total": total,
        "active": active,
        # Publishers count active parameters differently: gpt-oss leaves out the input embedding (a
        # lookup, no matmul), GLM-4.5 both embedding and LM head.
        "active_without_input_embedding": active - total_breakdown["embedding"],
        "active_without_embeddings": active - total_breakdown["embedding"] - total_breakdown["lm_head"],
        "total_breakdown": total_breakdown,
        "active_breakdown": active_breakdown,
        "expert_params": total_breakdown["experts"],
        "non_expert_params": total - total_breakdown["experts"],
        "moe_layers": moe_layers,
        "dense_layers": dense_layers,
    }


# ----------------------------------------------------------------------------------------------
# FLOPs


def _mean_context(seq_len: int, sliding_window: int | None) -> float:
    """Average number of keys a query attends to under a causal (optionally windowed) mask."""
    w = seq_len if sliding_window is None else min(sliding_window, seq_len)
    # positions 1..w see themselves + earlier tokens; the rest see exactly w keys
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _flops(cfg: ModelConfig, matmul_params: int, seq_len: int) -> dict[str, Any]:
    attn_dim = cfg.num_heads * cfg.head_size
    ctx = _mean_context(seq_len, cfg.sliding_window)
    # QK^T and AV: 2 FLOPs per multiply-add, 2 matmuls, attn_dim wide, ctx keys, every layer
    attention_forward = 4 * cfg.num_layers * attn_dim * ctx
    forward = 2 * matmul_params + attention_forward
    return {
        "seq_len": seq_len,
        "matmul_params": matmul_params,
        "forward_matmul": 2 * matmul_params,
        "forward_attention": round(attention_forward),
        "forward": round(forward),
        "backward": round(2 * forward),
        "training": round(3 * forward),
        "inference": round(forward),
    }


def flops_per_token(model_cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Forward / training / inference FLOPs per token at ``seq_len`` (default ``max_seq_len``).

    forward = 2 * matmul_params + 4 * n_layers * (heads * head_dim) * mean_causal_context, where
    matmul_params = active params minus the input embedding (a lookup) and the norms
    (elementwise), plus the LM head matmul (also when tied). Training = 3 x forward.
    """
    seq_len = seq_len or model_cfg.max_seq_len
    counts = count_params(model_cfg)
    a = counts["active_breakdown"]
    matmul = (
        a["attention"]
        + a["router"]
        + a["experts"]
        + a["shared_expert"]
        + a["dense_ffn"]
        + _lm_head_matmul(model_cfg)
    )
    out = _flops(model_cfg, matmul, seq_len)
    out["six_n_active"] = 6 * counts["active"]  # the 6N rule of thumb, for comparison
    return out


def _lm_head_matmul(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.hidden_size


# ----------------------------------------------------------------------------------------------
# dense equivalent


def dense_equivalent(model_cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """The dense model with the same active parameters: same shape, every MoE layer replaced by
    one SwiGLU FFN of width ``top_k * ffn_hidden_size`` (no router)."""
    cfg = model_cfg
    counts = count_params(cfg)
    bd = dict(counts["active_breakdown"])
    bd["dense_ffn"] += bd["experts"]
    bd["experts"] = 0
    bd["router"] = 0
    total = sum(bd.values())
    matmul = bd["attention"] + bd["shared_expert"] + bd["dense_ffn"] + _lm_head_matmul(cfg)
    flops = _flops(cfg, matmul, seq_len or cfg.max_seq_len)
    return {
        "ffn_hidden_size": cfg.top_k * cfg.ffn_hidden_size if counts["moe_layers"] else cfg.dense_ffn_size,
        "total_params": total,
        "active_params": total,
        "breakdown": bd,
        "flops_per_token": {k: flops[k] for k in ("forward", "training", "inference")},
        "weights_bytes": {d: total * b["weights"] for d, b in BYTES_PER_PARAM.items()},
        "training_state_bytes": {d: total * sum(b.values()) for d, b in BYTES_PER_PARAM.items()},
    }


# ----------------------------------------------------------------------------------------------
# parallel layout, memory, all-to-all


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


# ----------------------------------------------------------------------------------------------
# the whole report


def build_plan(
    model_cfg: ModelConfig,
    *,
    ep_size: int = 1,
    dp_size: int | None = None,
    zero_stage: int = 0,
    dtype: str = "bf16",
    seq_len: int | None = None,
) -> dict[str, Any]:
    """Everything ``python -m moetrain.plan`` prints, as one JSON-able dict.

    ``dp_size`` defaults to ``ep_size``. ``memory`` holds both fp32 and bf16 training; ``dtype``
    sets the all-to-all element size.
    """
    dp_size = ep_size if dp_size is None else dp_size
    check_parallel(model_cfg, ep_size=ep_size, dp_size=dp_size, zero_stage=zero_stage)
    counts = count_params(model_cfg)
    seq_len = seq_len or model_cfg.max_seq_len
    flops = flops_per_token(model_cfg, seq_len)
    dense = dense_equivalent(model_cfg, seq_len)
    memory: dict[str, Any] = {
        "layout": {
            "world_size": dp_size,
            "dp_size": dp_size,
            "ep_size": ep_size,
            "expert_dp_size": dp_size // ep_size,
            "experts_per_rank": model_cfg.num_experts // ep_size,
            "zero_stage": zero_stage,
        }
    }
    for d in BYTES_PER_PARAM:
        memory[d] = memory_plan(model_cfg, ep_size=ep_size, dp_size=dp_size, zero_stage=zero_stage, dtype=d)
    memory["inference_weights_bytes"] = {
        d: counts["total"] * b["weights"] for d, b in BYTES_PER_PARAM.items()
    }
    cfg = model_cfg
    return {
        "model": cfg.name,
        "shape": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_size,
            "ffn_hidden_size": cfg.ffn_hidden_size,
            "dense_ffn_hidden_size": cfg.dense_ffn_size,
            "num_experts": cfg.num_experts,
            "top_k": cfg.top_k if cfg.num_experts else 0,
            "moe_layers": counts["moe_layers"],
            "moe_layer_ids": cfg.moe_layer_ids,
            "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
            "shared_expert_gate": cfg.shared_expert_gate,
            "normalize_top_k": cfg.moe.normalize_top_k,
            "qk_norm": cfg.qk_norm,
            "attention_bias": cfg.attention_bias,
            "tie_embeddings": cfg.tie_embeddings,
            "max_seq_len": cfg.max_seq_len,
        },
        "total_params": counts["total"],
        "active_params": counts["active"],
        "active_fraction": counts["active"] / counts["total"],
        "total_over_active": counts["total"] / counts["active"],
        "total_breakdown": counts["total_breakdown"],
        "active_breakdown": counts["active_breakdown"],
        "flops_per_token": flops,
        "memory": memory,
        "dense_equivalent": dense,
        "all_to_all": all_to_all_volume(cfg, ep_size=ep_size, dtype=dtype),
    }


# ----------------------------------------------------------------------------------------------
# formatting


def fmt_count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_flops(n: float) -> str:
    for div, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "KFLOP")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} FLOP"


def fmt_bytes(n: float) -> str:
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def plan_summary(
    model_cfg: ModelConfig,
    *,
    ep_size: int = 1,
    dp_size: int = 1,
    zero_stage: int = 0,
    dtype: str = "fp32",
    seq_len: int | None = None,
) -> list[str]:
    """Three short lines for the start of a training run (params, compute, memory per rank)."""
    counts = count_params(model_cfg)
    seq_len = seq_len or model_cfg.max_seq_len
    flops = flops_per_token(model_cfg, seq_len)
    mem = memory_plan(model_cfg, ep_size=ep_size, dp_size=dp_size, zero_stage=zero_stage, dtype=dtype)
    r = mem["per_rank"]
    return [
        f"params: {fmt_count(counts['total'])} total, {fmt_count(counts['active'])} active per token "
        f"({counts['active'] / counts['total']:.1%} active, total/active {counts['total'] / counts['active']:.2f}x)",
        f"compute: {fmt_flops(flops['training'])}/token training, {fmt_flops(flops['forward'])}/token forward "
        f"(seq_len {seq_len})",
        f"memory/rank ({mem['dtype']}, ep={ep_size}, dp={dp_size}, ZeRO-{zero_stage}): {fmt_bytes(r['total'])} = "
        f"weights {fmt_bytes(r['weights'])} + grads {fmt_bytes(r['grads'])} + optimizer {fmt_bytes(r['optimizer'])}",
    ]


def _table(console: Any, heading: str) -> Any:
    from rich.table import Table

    console.print()
    console.print(f"[bold]{heading}[/bold]")
    return Table()


def render(plan: dict[str, Any], console: Any = None) -> None:
    """Print ``plan`` as rich tables."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=110)
    s = plan["shape"]
    moe = f"{s['num_experts']} experts, top-{s['top_k']}, {s['moe_layers']}/{s['num_layers']} MoE layers"
    if not s["num_experts"]:
        moe = "dense (no experts)"
    console.print(
        f"[bold]{plan['model']}[/bold]: H={s['hidden_size']}, L={s['num_layers']}, heads={s['num_heads']}/"
        f"{s['num_kv_heads']}kv x {s['head_dim']}, F={s['ffn_hidden_size']}, V={s['vocab_size']}, {moe}"
    )
    options = [f"qk_norm={s['qk_norm']}"] if s.get("qk_norm", "none") != "none" else []
    if s.get("attention_bias"):
        options.append("q/k/v bias")
    if s["num_experts"]:
        if s.get("shared_expert_intermediate_size"):
            gate = " (sigmoid gate)" if s.get("shared_expert_gate") else ""
            options.append(f"shared expert F={s['shared_expert_intermediate_size']}{gate}")
        if not s.get("normalize_top_k", True):
            options.append("top-k weights not renormalised")
        if s["moe_layers"] != s["num_layers"]:
            options.append(f"MoE layers {s['moe_layer_ids']}")
    if options:
        console.print("options: " + ", ".join(options))
    source = plan.get("vocab_source", "")
    if source.startswith("data."):
        console.print(
            f"V={s['vocab_size']} comes from {source}: a run on other data has another vocab; "
            "`plan +experiment=NAME` counts exactly what that recipe trains."
        )

    t = _table(console, "Parameters")
    t.add_column("component")
    t.add_column("total", justify="right")
    t.add_column("active / token", justify="right")
    for k in COMPONENTS:
        tot, act = plan["total_breakdown"][k], plan["active_breakdown"][k]
        if tot or act:
            t.add_row(k, f"{tot:,}", f"{act:,}")
    t.add_row(
        "[bold]sum[/bold]",
        f"[bold]{plan['total_params']:,} ({fmt_count(plan['total_params'])})[/bold]",
        f"[bold]{plan['active_params']:,} ({fmt_count(plan['active_params'])})[/bold]",
    )
    console.print(t)
    console.print(
        f"active fraction {plan['active_fraction']:.1%}; total/active = {plan['total_over_active']:.2f}x "
        "(the memory tax: every expert is stored, top_k compute)"
    )

    f = plan["flops_per_token"]
    t = _table(console, f"FLOPs per token (seq_len {f['seq_len']}, causal mask)")
    t.add_column("")
    t.add_column("FLOPs", justify="right")
    t.add_row("forward: matmuls (2 x matmul params)", fmt_flops(f["forward_matmul"]))
    t.add_row("forward: attention scores (QK^T, AV)", fmt_flops(f["forward_attention"]))
    t.add_row("forward = inference", fmt_flops(f["forward"]))
    t.add_row("training (3 x forward)", fmt_flops(f["training"]))
    t.add_row("6N (active) rule of thumb", fmt_flops(f["six_n_active"]))
    console.print(t)

    m = plan["memory"]
    lay = m["layout"]
    t = _table(
        console,
        f"Training memory, AdamW: {lay['world_size']} rank(s), ep={lay['ep_size']} "
        f"({lay['experts_per_rank']} expert(s)/layer/rank), expert-dp={lay['expert_dp_size']}, "
        f"ZeRO-{lay['zero_stage']}",
    )
    t.add_column("")
    for d in BYTES_PER_PARAM:
        t.add_column(f"{d} total", justify="right")
        t.add_column(f"{d} per rank", justify="right")
    for k in ("weights", "grads", "optimizer", "total"):
        row = [k]
        for d in BYTES_PER_PARAM:
            row += [fmt_bytes(m[d]["total"][k]), fmt_bytes(m[d]["per_rank"][k])]
        t.add_row(*row)
    console.print(t)
    pr = m["bf16"]["per_rank_params"]
    console.print(
        f"params per rank: {fmt_count(pr['total'])} = {fmt_count(pr['non_expert'])} replicated + "
        f"{fmt_count(pr['expert'])} expert"
    )
    console.print("bytes/param: fp32 4+4+8, bf16 2+2+12 (fp32 master + 2 fp32 moments)")
    console.print("Activations, buffers and allocator slack are not included.")

    d = plan["dense_equivalent"]
    t = _table(
        console, f"MoE vs dense equivalent (same active params: one SwiGLU of width {d['ffn_hidden_size']})"
    )
    t.add_column("")
    t.add_column("MoE", justify="right")
    t.add_column("dense equivalent", justify="right")
    t.add_column("MoE / dense", justify="right")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    rows = [
        ("total params", plan["total_params"], d["total_params"], fmt_count),
        ("active params / token", plan["active_params"], d["active_params"], fmt_count),
        ("training FLOPs / token", f["training"], d["flops_per_token"]["training"], fmt_flops),
        ("weights, bf16", m["inference_weights_bytes"]["bf16"], d["weights_bytes"]["bf16"], fmt_bytes),
        (
            "training state, bf16+AdamW",
            m["bf16"]["total"]["total"],
            d["training_state_bytes"]["bf16"],
            fmt_bytes,
        ),
    ]
    for name, a, b, fmt in rows:
        t.add_row(name, fmt(a), fmt(b), ratio(a, b))
    console.print(t)

    a2a = plan["all_to_all"]
    t = _table(
        console,
        f"Expert all-to-all, bytes sent per token (ep={a2a['ep_size']}, {a2a['dtype']}, uniform routing)",
    )
    t.add_column("")
    t.add_column("forward", justify="right")
    t.add_column("training (fwd+bwd)", justify="right")
    for label, key in (
        ("per MoE layer", "per_token_per_layer"),
        (f"all {a2a['moe_layers']} MoE layers", "per_token"),
    ):
        t.add_row(label, fmt_bytes(a2a[key]["forward"]), fmt_bytes(a2a[key]["training"]))
    console.print(t)
    if a2a["ep_size"] == 1:
        console.print("ep_size=1: every expert is local, no all-to-all traffic.")


# ----------------------------------------------------------------------------------------------
# CLI


def _plan_from_cfg(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from moetrain.config import model_config_from_dict, parallel_config_from_dict

    model_cfg = model_config_from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    par = parallel_config_from_dict(OmegaConf.to_container(cfg.parallel, resolve=True))
    plan_cfg = OmegaConf.to_container(cfg.get("plan", {}), resolve=True) or {}
    fmt = plan_cfg.get("format", "table")
    if fmt not in ("table", "json"):
        raise ConfigError(f"plan.format={fmt!r} is invalid: one of table, json")
    seq_len = plan_cfg.get("seq_len")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len <= 0):
        raise ConfigError(
            f"plan.seq_len={seq_len!r} is invalid: a positive integer or null (= model.max_seq_len)"
        )
    dtype = plan_cfg.get("dtype") or (par.dtype if par.dtype != "auto" else "bf16")
    if dtype not in BYTES_PER_PARAM:
        raise ConfigError(f"plan.dtype={dtype!r} is invalid: one of fp32, bf16 (or null)")
    plan = build_plan(
        model_cfg,
        ep_size=par.ep_size,
        dp_size=plan_cfg.get("dp_size"),
        zero_stage=par.zero_stage,
        dtype=dtype,
        seq_len=seq_len,
    )
    plan["vocab_source"] = _vocab_source(cfg)
    return {"format": fmt, "plan": plan}


def _vocab_source(cfg: Any) -> str:
    """Where model.vocab_size came from: the data preset's tokenizer size, or the model itself."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg.model, resolve=False).get("vocab_size")
    if isinstance(raw, str) and "data.vocab_size" in raw:
        return f"data.vocab_size (data={cfg.data.name})"
    return "model.vocab_size"


def _hydra_entry() -> None:
    import hydra

    from moetrain import CONFIG_DIR

    @hydra.main(config_path=str(CONFIG_DIR), config_name="plan", version_base="1.3")
    def _main(cfg: Any) -> None:
        try:
            out = _plan_from_cfg(cfg)
        except Exception as e:  # ConfigError, and OmegaConf's interpolation errors
            lines = str(e).strip().splitlines()
            print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
            sys.exit(2)
        if out["format"] == "json":
            print(json.dumps(out["plan"], indent=2))
        else:
            render(out["plan"])

    _main()


def main() -> None:
    _hydra_entry()


if __name__ == "__main__":
    from moetrain.cli import skip_exit_collection

    skip_exit_collection()
    main()
