"""The whole plan as one JSON-able dict, its rich tables, and the lines a training run logs at start."""

from __future__ import annotations

import dataclasses
from typing import Any

from moetrain.config import ModelConfig
from moetrain.plan.fmt import fmt_bytes, fmt_count, fmt_flops
from moetrain.plan.memory import GIB, all_to_all_volume, fitting_settings, memory_plan
from moetrain.plan.params import BYTES_PER_PARAM, COMPONENTS, count_params, dense_equivalent, flops_per_token


def build_plan(
    model_cfg: ModelConfig,
    *,
    ep_size: int = 1,
    dp_size: int | None = None,
    zero_stage: int = 0,
    dtype: str = "bf16",
    seq_len: int | None = None,
    micro_batch_size: int = 1,
    activation_checkpointing: bool = False,
    offload_optimizer: bool = False,
    device_memory_gib: float = 80.0,
    disk_gbps: float = 2.0,
    ranks_per_node: int = 8,
) -> dict[str, Any]:
    """Everything ``python -m moetrain.plan`` prints, as one JSON-able dict.

    ``dp_size`` defaults to ``ep_size``. ``memory`` holds both fp32 and bf16 training, each with its
    fit verdict against ``device_memory_gib`` (and, when it does not fit, ``fitting_settings``);
    ``dtype`` sets the all-to-all element size.
    """
    dp_size = ep_size if dp_size is None else dp_size
    seq_len = seq_len or model_cfg.max_seq_len
    by_dtype = {  # memory_plan checks the layout (check_parallel) before anything is counted
        d: memory_plan(
            model_cfg,
            ep_size=ep_size,
            dp_size=dp_size,
            zero_stage=zero_stage,
            dtype=d,
            offload_optimizer=offload_optimizer,
            micro_batch_size=micro_batch_size,
            seq_len=seq_len,
            activation_checkpointing=activation_checkpointing,
            device_memory_gib=device_memory_gib,
        )
        for d in BYTES_PER_PARAM
    }
    settings = next(iter(by_dtype.values()))["settings"]  # memory_plan's keywords, as it read them
    counts = count_params(model_cfg)
    flops = flops_per_token(model_cfg, seq_len)
    dense = dense_equivalent(model_cfg, seq_len)
    memory: dict[str, Any] = {
        "layout": {
            "world_size": dp_size,
            **settings,
            "expert_dp_size": dp_size // ep_size,
            "experts_per_rank": model_cfg.num_experts // ep_size,
        },
        "device_memory_gib": device_memory_gib,
        **by_dtype,
    }
    for d, mem in by_dtype.items():
        if not mem["fits"]:
            mem["fitting_settings"] = fitting_settings(model_cfg, settings, d, int(device_memory_gib * GIB))
    memory["inference_weights_bytes"] = {
        d: counts["total"] * b["weights"] for d, b in BYTES_PER_PARAM.items()
    }
    cfg = model_cfg
    return {
        "model": cfg.name,
        "shape": shape_report(cfg, counts),
        "total_params": counts["total"],
        "active_params": counts["active"],
        # publishers' conventions: gpt-oss leaves out the input embedding, GLM-4.5 both embeddings
        "active_params_without_input_embedding": counts["active_without_input_embedding"],
        "active_params_without_embeddings": counts["active_without_embeddings"],
        "active_fraction": counts["active"] / counts["total"],
        "total_over_active": counts["total"] / counts["active"],
        "total_breakdown": counts["total_breakdown"],
        "active_breakdown": counts["active_breakdown"],
        "flops_per_token": flops,
        "memory": memory,
        "dense_equivalent": dense,
        "all_to_all": all_to_all_volume(cfg, ep_size=ep_size, dtype=dtype),
        "checkpoint": checkpoint_plan(cfg, ep_size, dp_size, disk_gbps, ranks_per_node),
    }


def checkpoint_plan(
    cfg: ModelConfig, ep_size: int, world_size: int, disk_gbps: float, ranks_per_node: int
) -> dict[str, Any]:
    """Checkpoint bytes (fp32 masters + AdamW moments) in total and for the busiest rank, and the
    write time at ``disk_gbps`` GB/s per node (moetrain/checkpoint/size.py)."""
    from moetrain.checkpoint.size import checkpoint_bytes, write_seconds

    sizes = checkpoint_bytes(cfg, ep_size=ep_size, world_size=world_size)
    secs = write_seconds(sizes, world_size=world_size, ranks_per_node=ranks_per_node, disk_gbps=disk_gbps)
    return {
        "total_bytes": sizes["total"],
        "per_rank_bytes": sizes["per_rank"],
        "disk_gbps": disk_gbps,
        "ranks_per_node": ranks_per_node,
        "write_s": secs,
    }


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
    mem = memory_plan(
        model_cfg, ep_size=ep_size, dp_size=dp_size, zero_stage=zero_stage, dtype=dtype, seq_len=seq_len
    )
    r = mem["per_rank"]
    return [
        f"params: {fmt_count(counts['total'])} total, {fmt_count(counts['active'])} active per token "
        f"({counts['active'] / counts['total']:.1%} active, total/active {counts['total'] / counts['active']:.2f}x)",
        f"compute: {fmt_flops(flops['training'])}/token training, {fmt_flops(flops['forward'])}/token forward "
        f"(seq_len {seq_len})",
        f"memory/rank ({mem['dtype']}, ep={ep_size}, dp={dp_size}, ZeRO-{zero_stage}): {fmt_bytes(r['total'])} = "
        f"weights {fmt_bytes(r['weights'])} + grads {fmt_bytes(r['grads'])} + optimizer {fmt_bytes(r['optimizer'])}",
    ]


def fit_line(mem: dict[str, Any]) -> str:
    """One line: does one rank fit ``device_memory_gib``, and if not, which settings would."""
    r = mem["per_rank"]
    budget = f"{mem['device_memory_gib']:g} GiB"
    head = f"{mem['dtype']}: {fmt_bytes(r['device_total'])} per device"
    if r["host_total"]:
        head += f" + {fmt_bytes(r['host_total'])} host"
    if mem["fits"]:
        return f"{head}: fits {budget}"
    options = mem.get("fitting_settings") or []
    fixes = "; ".join(f"{o['override']} ({fmt_bytes(o['device_total'])})" for o in options)
    return f"{head}: does NOT fit {budget}; " + (f"fits with {fixes}" if fixes else "no single change fits")


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
    options += _family_options(s)
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
        f"ZeRO-{lay['zero_stage']}{', optimizer offloaded' if lay['offload_optimizer'] else ''}, "
        f"micro-batch {lay['micro_batch_size']} x {lay['seq_len']} tokens"
        f"{', activation checkpointing' if lay['activation_checkpointing'] else ''}",
    )
    t.add_column("")
    for d in BYTES_PER_PARAM:
        t.add_column(f"{d} total", justify="right")
        t.add_column(f"{d} per rank", justify="right")
    for k in ("weights", "grads", "optimizer", "total"):
        row = [k + (" (state)" if k == "total" else "")]
        for d in BYTES_PER_PARAM:
            row += [fmt_bytes(m[d]["total"][k]), fmt_bytes(m[d]["per_rank"][k])]
        t.add_row(*row)
    for k, label in (
        ("fp32_grad_step", "fp32 grads at the step"),
        ("buffers", "reduce bucket / ZeRO-3 gather"),
        ("activations", "activations (peak)"),
        ("device_total", "device total"),
        ("host_total", "host total (offload)"),
    ):
        row = [label]
        for d in BYTES_PER_PARAM:
            row += ["", fmt_bytes(m[d]["per_rank"][k])]
        t.add_row(*row)
    console.print(t)
    for d in BYTES_PER_PARAM:
        console.print(fit_line(m[d]))
    pr = m["bf16"]["per_rank_params"]
    console.print(
        f"params per rank: {fmt_count(pr['total'])} = {fmt_count(pr['non_expert'])} replicated + "
        f"{fmt_count(pr['expert'])} expert"
    )
    console.print("bytes/param: fp32 4+4+8, bf16 2+2+12 (fp32 master + 2 fp32 moments)")
    console.print(
        "device total = state on the device + buffers + max(activations, fp32 grads at the step); "
        "allocator slack and the CUDA context are not included (docs/PLAN.md)."
    )

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
    ck = plan["checkpoint"]
    t = _table(console, f"Checkpoint (fp32 masters + AdamW), written at {ck['disk_gbps']} GB/s per node")
    t.add_column("total", justify="right")
    t.add_column("per rank (busiest)", justify="right")
    t.add_column("write time", justify="right")
    t.add_row(fmt_bytes(ck["total_bytes"]), fmt_bytes(ck["per_rank_bytes"]), f"{ck['write_s']:.1f} s")
    console.print(t)
    st = plan.get("step_time")
    if st:
        console.print()
        console.print(
            f"[bold]Step time on {st['cluster']}[/bold] (predicted, {st['tokens_per_step']:,} tokens per step): "
            f"compute {st['compute_s']:.3g} s + all-to-all {st['all_to_all_s']:.3g} s + gradient reduction "
            f"{st['grad_reduce_s']:.3g} s + optimizer {st['optimizer_s']:.3g} s "
            f"{overlap_text(st['overlapped_s'])}= {st['total_s']:.3g} s; {st['tokens_per_s']:,.0f} tokens/s, "
            f"{st['tokens_per_s_per_device']:,.0f} per device, MFU {st['mfu']:.1%}"
        )


def overlap_text(overlapped_s: float) -> str:
    return f"- overlapped {overlapped_s:.3g} s " if overlapped_s > 0 else "(nothing overlaps) "


def _family_options(s: dict[str, Any]) -> list[str]:
    """The gpt-oss / DeepSeek-V3 / GLM-4.5 options of a plan's shape, in a few words each."""
    out = []
    if s.get("mla"):
        q = s["mla"]["q_lora_rank"]
        out.append(f"MLA (kv latent {s['mla']['kv_lora_rank']}" + (f", q latent {q})" if q else ")"))
    if s.get("partial_rotary_factor", 1.0) != 1.0:
        out.append(f"RoPE on {s['partial_rotary_factor']:g} of each head")
    if s.get("rope_scaling"):
        out.append(f"RoPE {s['rope_scaling']['rope_type']} x{s['rope_scaling'].get('factor', 1):g}")
    if s.get("attention_sinks"):
        out.append("attention sinks")
    if s.get("layer_types") and s.get("sliding_window"):
        n = sum(t == "sliding_attention" for t in s["layer_types"])
        out.append(f"window {s['sliding_window']} on {n}/{len(s['layer_types'])} layers")
    if s.get("num_experts") and s.get("score_function") == "sigmoid":
        out.append("sigmoid router")
    if s.get("num_experts") and s.get("n_group", 1) > 1:
        out.append(f"groups {s['topk_group']} of {s['n_group']}")
    if s.get("num_experts") and s.get("routed_scaling_factor", 1.0) != 1.0:
        out.append(f"routed weights x{s['routed_scaling_factor']:g}")
    if s.get("expert_proj_bias"):
        out.append("expert biases")
    if s.get("expert_activation", "swiglu") != "swiglu":
        out.append(s["expert_activation"])
    return out


def shape_report(cfg: ModelConfig, counts: dict[str, Any]) -> dict[str, Any]:
    """The model's shape and options: every field a pretrained config fixes (marked ARCH in
    moetrain/config/model.py, model.moe's included) plus the derived sizes plan counts with."""
    from moetrain.config import MoEConfig, arch_fields

    out: dict[str, Any] = {k: getattr(cfg, k) for k in arch_fields()}
    out.update({k: getattr(cfg.moe, k) for k in arch_fields(MoEConfig)})
    out["mla"] = dataclasses.asdict(cfg.mla) if cfg.mla.enabled else None
    out["layer_types"] = list(cfg.layer_types)
    out["mlp_only_layers"] = list(cfg.mlp_only_layers)
    out.update(
        head_dim=cfg.head_size,
        dense_ffn_hidden_size=cfg.dense_ffn_size,
        top_k=cfg.top_k if cfg.num_experts else 0,
        moe_layers=counts["moe_layers"],
        moe_layer_ids=cfg.moe_layer_ids,
    )
    return out
