"""Predicted time of one optimizer step on a cluster (clusters.py): compute, expert all-to-all,
gradient reduction, optimizer; tokens/s and MFU. Formulas in docs/PLAN.md, "Step time".

Per rank and step (``grad_accum`` micro-batches of ``micro_batch_size x seq_len`` tokens):

* compute: training FLOPs (3x forward; 4x with activation checkpointing) of the dense matmuls
  (attention projections, router, shared expert, dense FFNs, LM head) at the large-GEMM efficiency,
  the experts' GEMMs at the efficiency of their row count (tokens per local expert), the attention
  scores, plus elementwise passes over the stored activations at memory bandwidth.
* all-to-all: dispatch + combine per MoE layer, forward and backward (and the recomputed forward),
  the share leaving the rank over NVLink-class or network bandwidth by where the ep group sits.
* gradient reduction: a ring all-reduce (ZeRO-0) or reduce-scatter + all-gather (ZeRO 1-3, the same
  bytes) of the gradients in ``parallel.grad_reduce_dtype`` (fp32 by default; bf16 halves the bytes),
  dense params over all ranks, experts over their expert-data-parallel group.
* optimizer: AdamW streams its state through memory (about 32 bytes per parameter it owns), or
  through the host with offload.

``total_s`` is their sum less ``overlapped_s``, what runs hidden behind compute:

* ``parallel.overlap_comm`` (DeepSpeed's, ZeRO 1-3; on by DeepSpeed's default at ZeRO-3 only): the
  gradient reduction behind the last micro-batch's backward, on a device with its own communication
  streams. A CPU host (``shared_compute``) has none: DeepSpeed's CPU accelerator runs the reduction
  in line, so nothing is hidden there.
* ``parallel.a2a_chunks`` = C > 1 (expert parallelism): each exchange in C pieces, chunk i+1's
  all-to-all in flight while chunk i's experts run, hides ``min(all-to-all, experts) * (1 - 1/C)``
  (the first dispatch and the last combine stay exposed); it costs C - 1 more latencies per exchange
  and expert GEMMs of 1/C the rows (lower efficiency). On a CPU host the exchange is copied by the
  same cores that run the GEMMs (gloo's threads), so nothing is hidden there either: only the costs
  remain (measured: docs/EXPERT_PARALLEL.md, "Overlap").
"""

from __future__ import annotations

from typing import Any

from moetrain.config import ModelConfig
from moetrain.plan.activations import activation_memory
from moetrain.plan.params import count_params, flops_per_token

ADAMW_BYTES_PER_PARAM = 32  # read grad, master, m, v; write master, m, v, weight (fp32/bf16 mixed)
GRAD_REDUCE_BYTES = {"fp32": 4, "bf16": 2}  # parallel.grad_reduce_dtype (communication_data_type)


def gemm_efficiency(cluster: dict[str, Any], rows: float, dtype: str | None = None) -> float:
    m_half = cluster.get("gemm_half_rows_by_dtype", {}).get(dtype, cluster["gemm_half_rows"])
    return cluster["gemm_efficiency"] * rows / (rows + m_half) if rows > 0 else cluster["gemm_efficiency"]


def _ring_time(nbytes: float, group: int, bandwidth: float, latency: float) -> float:
    if group <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (group - 1) / group * nbytes / bandwidth + 2 * (group - 1) * latency


def _link(cluster: dict[str, Any], group: int, spread: int) -> tuple[float, float]:
    """Bandwidth and latency of a group of ``group`` ranks laid over ``spread`` consecutive ranks."""
    if spread > cluster["devices_per_node"]:
        return cluster["inter_node_bandwidth"], cluster["inter_node_latency"]
    return cluster["intra_node_bandwidth"], cluster["intra_node_latency"]


def step_time(
    model_cfg: ModelConfig,
    cluster: dict[str, Any],
    *,
    ep_size: int = 1,
    dp_size: int = 1,
    zero_stage: int = 0,
    dtype: str = "bf16",
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    grad_accum: int = 1,
    activation_checkpointing: bool = False,
    offload_optimizer: bool = False,
    grad_reduce_dtype: str = "fp32",
    overlap_comm: bool | None = None,
    a2a_chunks: int = 1,
) -> dict[str, Any]:
    """Predicted seconds per optimizer step and its parts; tokens/s (global) and MFU."""
    cfg = model_cfg
    seq_len = seq_len or cfg.max_seq_len
    n = micro_batch_size * seq_len  # tokens per micro-batch per rank
    counts = count_params(cfg)
    a = counts["active_breakdown"]
    # processes of a shared host (CPU ranks) split its FLOP/s and its memory bandwidth
    shared = min(dp_size, cluster["devices_per_node"]) if cluster.get("shared_compute") else 1
    peak = cluster["matmul_flops"][dtype] / shared
    memory_bandwidth = cluster["memory_bandwidth"] / shared
    passes = 4 if activation_checkpointing else 3  # fwd + bwd (2x) (+ recomputed fwd)
    dense_params = (
        a["attention"] + a["router"] + a["shared_expert"] + a["dense_ffn"] + cfg.vocab_size * cfg.hidden_size
    )
    dense_s = passes * 2 * dense_params * n / (peak * gemm_efficiency(cluster, n, dtype))
    moe_layers = counts["moe_layers"]
    expert_s = 0.0
    rows_per_expert = 0.0
    chunks = a2a_chunks if moe_layers and ep_size > 1 else 1
    if moe_layers:
        rows_per_expert = n * cfg.top_k * ep_size / cfg.num_experts  # uniform routing, per local expert
        expert_flops = passes * 2 * a["experts"] * n
        expert_s = expert_flops / (peak * gemm_efficiency(cluster, rows_per_expert / chunks, dtype))
    f = flops_per_token(cfg, seq_len)
    attention_flops = 3 * f["forward_attention"] * n  # fwd + bwd, counted as plan counts them
    if dtype in cluster.get("attention_flops", {}):  # a measured fused-attention rate
        attn_rate = cluster["attention_flops"][dtype] / shared
    else:  # the GEMM curve at seq_len rows
        attn_rate = peak * gemm_efficiency(cluster, seq_len, dtype)
    attn_s = passes / 3 * attention_flops / attn_rate
    acts = activation_memory(
        cfg, micro_batch_size=micro_batch_size, seq_len=seq_len, dtype=dtype, checkpointing=False
    )
    # elementwise work: each stored activation written in forward, read and its gradient written in backward
    elementwise_s = 3 * acts["stored"] * passes / 3 / memory_bandwidth
    compute_s = grad_accum * (dense_s + expert_s + attn_s + elementwise_s)

    all_to_all_s = 0.0
    if moe_layers and ep_size > 1:
        elem = 2 if dtype == "bf16" else 4
        sent = n * cfg.top_k * cfg.hidden_size * elem * (ep_size - 1) / ep_size  # one direction, one layer
        exchanges = moe_layers * 2 * (2 if not activation_checkpointing else 3)  # dispatch+combine, fwd/bwd
        bw, lat = _link(cluster, ep_size, ep_size)
        all_to_all_s = grad_accum * exchanges * (sent / bw + chunks * (ep_size - 1) * lat)

    edp = dp_size // ep_size
    dense_p, local_expert_p = counts["non_expert_params"], counts["expert_params"] // ep_size
    bw_d, lat_d = _link(cluster, dp_size, dp_size)
    bw_e, lat_e = _link(cluster, edp, dp_size)  # expert-dp ranks sit ep apart: they span the world
    grad_bytes = GRAD_REDUCE_BYTES[grad_reduce_dtype]
    grad_reduce_s = _ring_time(dense_p * grad_bytes, dp_size, bw_d, lat_d) + _ring_time(
        local_expert_p * grad_bytes, edp, bw_e, lat_e
    )

    owned = dense_p / (dp_size if zero_stage >= 1 else 1) + local_expert_p / (edp if zero_stage >= 1 else 1)
    if offload_optimizer:  # gradients down, weights up over the host link; AdamW in host memory
        optimizer_s = owned * (4 + 2) / cluster[
            "host_bandwidth"
        ] + owned * ADAMW_BYTES_PER_PARAM / cluster.get("host_memory_bandwidth", 100e9)
    else:
        optimizer_s = owned * ADAMW_BYTES_PER_PARAM / memory_bandwidth

    overlapped_s = 0.0
    reduce_overlaps = overlap_comm if overlap_comm is not None else zero_stage == 3  # DeepSpeed's default
    if zero_stage >= 1 and reduce_overlaps and not cluster.get("shared_compute"):
        last_backward_s = compute_s / grad_accum * (passes - 1) / passes
        overlapped_s += min(grad_reduce_s, last_backward_s)
    if chunks > 1 and not cluster.get("shared_compute"):
        overlapped_s += min(all_to_all_s, grad_accum * expert_s) * (1 - 1 / chunks)
    overlapped_s = min(overlapped_s, compute_s)  # both hide behind the same compute at most once
    total_s = compute_s + all_to_all_s + grad_reduce_s + optimizer_s - overlapped_s
    tokens = n * grad_accum * dp_size
    tokens_per_s = tokens / total_s
    mfu = f["training"] * tokens_per_s / (dp_size * peak)
    return {
        "cluster": cluster.get("name", "custom"),
        "compute_s": compute_s,
        "compute_breakdown_s": {
            "dense_matmuls": grad_accum * dense_s,
            "experts": grad_accum * expert_s,
            "attention_scores": grad_accum * attn_s,
            "elementwise": grad_accum * elementwise_s,
        },
        "expert_rows": rows_per_expert,
        "expert_gemm_efficiency": gemm_efficiency(cluster, rows_per_expert / chunks, dtype)
        if moe_layers
        else None,
        "all_to_all_s": all_to_all_s,
        "grad_reduce_s": grad_reduce_s,
        "optimizer_s": optimizer_s,
        "overlapped_s": overlapped_s,
        "total_s": total_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / dp_size,
        "mfu": mfu,
    }
