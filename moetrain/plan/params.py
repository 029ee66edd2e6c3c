"""Parameter counts, FLOPs per token and the dense equivalent of a model config (exact arithmetic)."""

from __future__ import annotations

from typing import Any

from moetrain.config import ModelConfig

# Bytes per parameter for weights, gradients and AdamW state (two moments, plus an fp32 master
# copy of the weights when the weights themselves are 16-bit): the usual mixed-precision model.
BYTES_PER_PARAM: dict[str, dict[str, int]] = {
    "fp32": {"weights": 4, "grads": 4, "optimizer": 8},
    "bf16": {"weights": 2, "grads": 2, "optimizer": 12},
}
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

    Attention includes its biases (``attention_bias``, ``attention_out_bias``), sinks and, for
    multi-head latent attention, its latent norms; norms include QK-norm weights; experts their
    biases (``moe.expert_proj_bias``); the shared expert (and its gate) is active for every token.
    Returns ``{"total", "active", "active_without_input_embedding", "active_without_embeddings",
    "total_breakdown", "active_breakdown", "expert_params", "non_expert_params", "moe_layers",
    "dense_layers"}``. ``total`` equals
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
