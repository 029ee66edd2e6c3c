"""Checks of the model options that the gpt-oss, DeepSeek-V3 and GLM-4.5 families add (moetrain/hf/gpt_oss.py,
moetrain/hf/deepseek.py): per-layer attention types, partial RoPE, multi-head latent attention, the experts'
activation. Their defaults live in the dataclasses of moetrain/config/model.py (``ModelConfig``, ``MoEConfig``,
``MLAConfig``); ``ModelConfig.validate`` calls ``validate_family_options`` last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetrain.config.errors import _require

if TYPE_CHECKING:
    from moetrain.config.model import MLAConfig, ModelConfig, MoEConfig

# The experts' activation: silu(gate) * up, or gpt-oss's clamp(gate) * sigmoid(alpha clamp(gate)) * (clamp(up) + 1).
EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu")
# model.layer_types entries (transformers' names): a layer attends within model.sliding_window or to all.
LAYER_TYPES = ("sliding_attention", "full_attention")


def validate_family_options(cfg: ModelConfig, prefix: str = "model") -> None:
    _validate_experts(cfg.moe, f"{prefix}.moe")
    _require(
        0 < cfg.partial_rotary_factor <= 1 and cfg.rotary_dim >= 2 and cfg.rotary_dim % 2 == 0,
        f"{prefix}.partial_rotary_factor",
        cfg.partial_rotary_factor,
        f"must be in (0, 1] and rotate an even number of the head's {cfg.head_size} dims",
    )
    types = cfg.layer_types
    _require(
        isinstance(types, (list, tuple))
        and (not types or len(types) == cfg.num_layers)
        and all(t in LAYER_TYPES for t in types),
        f"{prefix}.layer_types",
        types,
        f"empty or one of {', '.join(LAYER_TYPES)} per layer ({cfg.num_layers})",
    )
    if any(t == "sliding_attention" for t in types):
        _require(
            cfg.sliding_window is not None,
            f"{prefix}.sliding_window",
            cfg.sliding_window,
            "must be set: model.layer_types has sliding_attention layers",
        )
    _validate_mla(cfg.mla, f"{prefix}.mla")
    if cfg.mla.enabled:
        _require(
            cfg.qk_norm == "none"
            and not cfg.attention_sinks
            and not cfg.attention_out_bias
            and not cfg.attention_bias
            and cfg.sliding_window is None
            and cfg.partial_rotary_factor == 1.0,
            f"{prefix}.mla.kv_lora_rank",
            cfg.mla.kv_lora_rank,
            "multi-head latent attention has no QK-norm, attention sinks, biases, sliding window or "
            "partial_rotary_factor here (its rotated part is mla.qk_rope_head_dim): turn those off",
        )


def _validate_experts(moe: MoEConfig, prefix: str) -> None:
    _require(
        moe.expert_activation in EXPERT_ACTIVATIONS,
        f"{prefix}.expert_activation",
        moe.expert_activation,
        f"one of {', '.join(EXPERT_ACTIVATIONS)}",
    )
    _require(moe.swiglu_limit > 0, f"{prefix}.swiglu_limit", moe.swiglu_limit, "must be > 0")


def _validate_mla(mla: MLAConfig, prefix: str) -> None:
    if not mla.enabled:
        _require(mla.kv_lora_rank == 0, f"{prefix}.kv_lora_rank", mla.kv_lora_rank, "must be >= 0 (0 = off)")
        return
    for name in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        v = getattr(mla, name)
        _require(isinstance(v, int) and v > 0, f"{prefix}.{name}", v, "must be a positive integer")
    _require(
        mla.qk_rope_head_dim % 2 == 0, f"{prefix}.qk_rope_head_dim", mla.qk_rope_head_dim, "must be even"
    )
    _require(
        mla.q_lora_rank is None or mla.q_lora_rank > 0,
        f"{prefix}.q_lora_rank",
        mla.q_lora_rank,
        "a positive integer or null (a full q projection)",
    )
