"""moetrain <-> transformers for the DeepSeek-V3-router families: DeepSeek-V3 (DeepseekV3ForCausalLM,
with multi-head latent attention: ``model.mla``, moetrain/model/mla.py) and GLM-4.5 (Glm4MoeForCausalLM).

What they add to the decoder of moetrain/hf/config.py, as model options:

    transformers (config.json)        ours
    sigmoid router, e_score_correction_bias  moe.score_function=sigmoid, moe.selection_bias=true
    n_group, topk_group               moe.n_group, moe.topk_group (group-limited routing)
    routed_scaling_factor             moe.routed_scaling_factor
    norm_topk_prob                    moe.normalize_top_k
    n_shared_experts                  shared_expert_intermediate_size = n_shared_experts * moe_intermediate_size
                                      (no gate: shared_expert_gate=false)
    first_k_dense_replace = k         mlp_only_layers = [0, ..., k-1] (dense FFN of intermediate_size)
    use_qk_norm (GLM)                 qk_norm=per_head
    partial_rotary_factor (GLM)       partial_rotary_factor
    rope_parameters (yarn: DeepSeek-V3) rope_scaling (moetrain/model/rope.py; MLA: mscale_all_dim scales the softmax)
    attention_bias (GLM: q, k, v)     attention_bias

Tensor names beyond moetrain/hf/state.py's mapping (in memory and on disk):

    layers.i.ffn.router.expert_bias          model.layers.i.mlp.gate.e_score_correction_bias
    layers.i.ffn.shared_expert.{w1,w3,w2}    model.layers.i.mlp.shared_experts.{gate,up,down}_proj
                                             ("shared_experts", plural; Qwen2-MoE's is "shared_expert")
    layers.i.attention.<MLA>.weight          model.layers.i.self_attn.<MLA>.weight, <MLA> one of q_a_proj,
                                             q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj

Multi-token prediction layers of the checkpoints (``num_nextn_predict_layers``; transformers skips
them on load too) are not loaded: see ``mtp_layer_ids``.
"""

from __future__ import annotations

from typing import Any

from moetrain.config import MLAConfig, ModelConfig, MoEConfig
from moetrain.hf.common import decoder_config, decoder_fields, refuse, require_silu, warn_capacity
from moetrain.model.rope import rope_parameters_for_hf, rope_scaling_from_hf

DEEPSEEK_FAMILIES = ("glm4_moe", "deepseek_v3")
MLA_MODULES = ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")

# Per-layer names only these families use (ours -> transformers').
LAYER_RENAMES = {
    "ffn.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_expert.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_expert.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_expert.w2.weight": "mlp.shared_experts.down_proj.weight",
    **{f"attention.{m}.weight": f"self_attn.{m}.weight" for m in MLA_MODULES},
}
LAYER_RENAMES_INV = {v: k for k, v in LAYER_RENAMES.items()}
ARCHITECTURES = ("Glm4MoeForCausalLM", "DeepseekV3ForCausalLM")


def is_deepseek_style(cfg: ModelConfig) -> bool:
    """Sigmoid router scores and an ungated shared expert: the DeepSeek-V3 MoE block."""
    return (
        cfg.num_experts > 0
        and cfg.moe.score_function == "sigmoid"
        and cfg.shared_expert_intermediate_size > 0
        and not cfg.shared_expert_gate
    )


def leading_dense_layers(cfg: ModelConfig) -> int:
    """``first_k_dense_replace``: the dense layers must be exactly layers 0..k-1."""
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if dense != list(range(len(dense))):
        refuse(
            f"GLM-4.5 / DeepSeek-V3 have dense FFNs in the first layers only (first_k_dense_replace); this model "
            f"has dense layers {dense} (model.moe_every={cfg.moe_every}, mlp_only_layers={list(cfg.mlp_only_layers)})"
        )
    return len(dense)


def architecture(cfg: ModelConfig) -> str:
    """The class of a DeepSeek-style model (``is_deepseek_style``), or a one-line ``ValueError``."""
    arch = "DeepseekV3ForCausalLM" if cfg.mla.enabled else "Glm4MoeForCausalLM"
    if cfg.mla.enabled and cfg.attention_bias:
        refuse(f"{arch} here has no attention biases; this model has model.attention_bias=true")
    leading_dense_layers(cfg)
    if cfg.shared_expert_intermediate_size % cfg.ffn_hidden_size:
        refuse(
            f"{arch} sizes its shared experts as n_shared_experts x moe_intermediate_size; "
            f"model.shared_expert_intermediate_size={cfg.shared_expert_intermediate_size} is not a multiple of "
            f"model.ffn_hidden_size={cfg.ffn_hidden_size}"
        )
    if cfg.qk_norm == "full":
        refuse(f"{arch} normalises q / k per head (use_qk_norm); this model has model.qk_norm=full")
    if cfg.sliding_window is not None:
        refuse(f"{arch} has no sliding window; this model has model.sliding_window={cfg.sliding_window}")
    return arch


def to_hf_config(cfg: ModelConfig, tokenizer: Any | None = None):
    """The transformers config of ``architecture(cfg)``."""
    from transformers import DeepseekV3Config, Glm4MoeConfig

    arch = architecture(cfg)
    warn_capacity(cfg)
    rope = rope_parameters_for_hf(cfg.rope_theta, cfg.rope_scaling)
    common = dict(
        **decoder_config(cfg, tokenizer),
        hidden_act="silu",
        attention_bias=cfg.attention_bias,
        intermediate_size=cfg.dense_ffn_size,
        moe_intermediate_size=cfg.ffn_hidden_size,
        n_routed_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        n_shared_experts=cfg.shared_expert_intermediate_size // cfg.ffn_hidden_size,
        first_k_dense_replace=leading_dense_layers(cfg),
        n_group=cfg.moe.n_group,
        topk_group=cfg.moe.topk_group,
        routed_scaling_factor=cfg.moe.routed_scaling_factor,
        norm_topk_prob=cfg.moe.normalize_top_k,
        num_nextn_predict_layers=0,
        output_router_logits=False,
    )
    if arch == "DeepseekV3ForCausalLM":
        mla = cfg.mla
        del common["head_dim"]  # DeepseekV3Config sets it to qk_rope_head_dim
        common["num_key_value_heads"] = cfg.num_heads
        return DeepseekV3Config(
            **common,
            rope_parameters=rope,
            q_lora_rank=mla.q_lora_rank,
            kv_lora_rank=mla.kv_lora_rank,
            qk_rope_head_dim=mla.qk_rope_head_dim,
            qk_nope_head_dim=mla.qk_nope_head_dim,
            v_head_dim=mla.v_head_dim,
            rope_interleave=mla.rope_interleave,
        )
    rope["partial_rotary_factor"] = float(cfg.partial_rotary_factor)
    return Glm4MoeConfig(**common, rope_parameters=rope, use_qk_norm=cfg.qk_norm == "per_head")


def from_hf_config(hf_config: Any) -> ModelConfig:
    """Our ``ModelConfig`` for a GLM-4.5 config. The MoE training settings are DeepSeek-V3's
    (arXiv 2412.19437): the sequence-wise balance loss at alpha = 1e-4, no Switch aux or z-loss, the
    checkpoint's selection bias held fixed (``moe.bias_update_rate`` > 0 resumes aux-loss-free updates)."""
    t = hf_config.model_type
    require_silu(hf_config)
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    partial_rotary_factor = float(rope.pop("partial_rotary_factor", 1.0))  # ours: a model option (GLM)
    rope_scaling = rope_scaling_from_hf(rope, t)  # DeepSeek-V3's long-context checkpoints: YaRN
    fields = decoder_fields(hf_config)
    k_dense = int(hf_config.first_k_dense_replace or 0)
    moe = MoEConfig(
        aux_loss_weight=0.0,
        z_loss_weight=0.0,
        seq_aux_loss_weight=1e-4,
        score_function="sigmoid",
        normalize_top_k=bool(hf_config.norm_topk_prob),
        n_group=int(hf_config.n_group or 1),
        topk_group=int(hf_config.topk_group or 1),
        routed_scaling_factor=float(hf_config.routed_scaling_factor),
        selection_bias=True,
    )
    if t == "deepseek_v3":
        if getattr(hf_config, "attention_bias", False):
            raise ValueError("deepseek_v3: attention_bias=true is not supported")
        # MLA: every head has its own keys and values, its head size follows from the MLA ranks
        fields.update(num_kv_heads=hf_config.num_attention_heads, head_dim=None)
        fields["mla"] = MLAConfig(
            kv_lora_rank=hf_config.kv_lora_rank,
            q_lora_rank=hf_config.q_lora_rank,
            qk_rope_head_dim=hf_config.qk_rope_head_dim,
            qk_nope_head_dim=hf_config.qk_nope_head_dim,
            v_head_dim=hf_config.v_head_dim,
            rope_interleave=bool(getattr(hf_config, "rope_interleave", False)),
        )
    cfg = ModelConfig(
        ffn_hidden_size=hf_config.moe_intermediate_size,
        dense_ffn_hidden_size=hf_config.intermediate_size,
        num_experts=hf_config.n_routed_experts,
        top_k=hf_config.num_experts_per_tok,
        mlp_only_layers=list(range(min(k_dense, hf_config.num_hidden_layers))),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        partial_rotary_factor=partial_rotary_factor,
        qk_norm="per_head" if getattr(hf_config, "use_qk_norm", False) else "none",
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        shared_expert_intermediate_size=hf_config.n_shared_experts * hf_config.moe_intermediate_size,
        moe=moe,
        **fields,
    )
    cfg.validate()
    return cfg


def mtp_layer_ids(hf_config: Any) -> range:
    """Layer indices of the checkpoint's multi-token-prediction modules (after the decoder's layers)."""
    n = int(getattr(hf_config, "num_nextn_predict_layers", 0) or 0)
    return range(hf_config.num_hidden_layers, hf_config.num_hidden_layers + n)
