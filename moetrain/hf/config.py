"""Our ``ModelConfig`` <-> transformers configs (the families in moetrain/hf/__init__.py), and which
transformers class holds a model (``hf_architecture``)."""

from __future__ import annotations

from typing import Any

from moetrain.config import ModelConfig, MoEConfig
from moetrain.hf import deepseek, gpt_oss
from moetrain.hf.common import aux_coef, decoder_config, decoder_fields, refuse, require_silu, warn_capacity
from moetrain.model.rope import rope_parameters_for_hf, rope_scaling_from_hf

# model_type -> what it becomes here (dense families are what sparse upcycling starts from).
MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
DENSE_FAMILIES = ("mistral", "llama", "qwen3")


# ---- which transformers class holds a model -------------------------------------------------------
def _check_router(cfg: ModelConfig, arch: str) -> None:
    if cfg.moe.score_function != "softmax":
        refuse(
            f"transformers' {arch} scores experts with a softmax; this model was trained with "
            f"model.moe.score_function={cfg.moe.score_function} (DeepSeek-V3 routing), which it cannot hold, "
            "so its exported routing and logits would differ"
        )
    if cfg.moe.n_group > 1 or cfg.moe.routed_scaling_factor != 1.0:
        refuse(
            f"transformers' {arch} has no group-limited routing nor routed_scaling_factor; this model uses "
            f"model.moe.n_group={cfg.moe.n_group}, routed_scaling_factor={cfg.moe.routed_scaling_factor}, so its "
            "exported routing and logits would differ"
        )
    if cfg.moe.bias_update_rate > 0 or cfg.moe.selection_bias:
        refuse(
            f"transformers' {arch} has no expert-selection bias; this model was trained with aux-loss-free "
            f"balancing (model.moe.bias_update_rate={cfg.moe.bias_update_rate}), so its exported routing would "
            "differ; pass --drop-expert-bias to export without the bias anyway"
        )


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that holds ``cfg`` exactly, or a one-line ``ValueError`` saying why none does.

    It follows from the model's options, so a model keeps the architecture it came from: QK-norm over
    the whole projection -> OLMoE, per head -> Qwen3(-MoE), a shared expert or q/k/v bias -> Qwen2-MoE,
    none of these -> Mixtral (dense: Mistral). Sigmoid scores with an ungated shared expert: the
    DeepSeek-V3 families (moetrain/deepseek.py)."""
    if deepseek.is_deepseek_style(cfg):
        return deepseek.architecture(cfg)
    if cfg.attention_sinks:
        return gpt_oss.architecture(cfg)
    every_layer_moe = len(cfg.moe_layer_ids) == cfg.num_layers
    if cfg.num_experts == 0:
        if cfg.attention_bias:
            refuse(
                "a dense model with model.attention_bias=true has no transformers class here (Qwen2 is not mapped)"
            )
        return {"none": "MistralForCausalLM", "per_head": "Qwen3ForCausalLM"}.get(cfg.qk_norm) or refuse(
            "a dense model with model.qk_norm=full (OLMo-style) has no transformers class here"
        )
    if cfg.qk_norm == "full":
        arch = "OlmoeForCausalLM"
        if cfg.attention_bias or cfg.shared_expert_intermediate_size:
            refuse(
                "OLMoE has no q/k/v bias and no shared expert: this model cannot export as OlmoeForCausalLM"
            )
        if not every_layer_moe:
            refuse(
                f"OLMoE has an MoE FFN in every layer; this model has dense layers (model.moe_every={cfg.moe_every}, "
                f"model.mlp_only_layers={list(cfg.mlp_only_layers)})"
            )
        if cfg.head_dim not in (None, cfg.hidden_size // cfg.num_heads) or cfg.sliding_window is not None:
            refuse("OLMoE has head_dim = hidden_size / num_heads and no sliding window; this model differs")
    elif cfg.qk_norm == "per_head":
        arch = "Qwen3MoeForCausalLM"
        if cfg.attention_bias or cfg.shared_expert_intermediate_size:
            refuse(
                "Qwen3-MoE has no q/k/v-only bias and no shared expert: this model cannot export as Qwen3MoeForCausalLM"
            )
    elif cfg.shared_expert_intermediate_size or cfg.attention_bias:
        arch = "Qwen2MoeForCausalLM"
        if not (cfg.shared_expert_intermediate_size and cfg.shared_expert_gate):
            refuse(
                "Qwen2-MoE always has a gated shared expert: set model.shared_expert_intermediate_size > 0 and "
                "model.shared_expert_gate=true, or drop model.attention_bias to export as Mixtral"
            )
        if cfg.sliding_window is not None:
            refuse("Qwen2-MoE's sliding window applies to some layers only; this model has one everywhere")
    else:
        arch = "MixtralForCausalLM"
        if not every_layer_moe:
            refuse(
                f"Mixtral has an MoE FFN in every layer; this model has model.moe_every={cfg.moe_every} "
                f"(dense layers in between; mlp_only_layers={list(cfg.mlp_only_layers)}), which no transformers "
                "architecture without QK-norm or shared experts expresses; only fully MoE (moe_every=1) or "
                "fully dense (num_experts=0, as MistralForCausalLM) models export"
            )
        if not cfg.moe.normalize_top_k:
            refuse(
                "transformers' Mixtral always renormalises the top-k router weights; this model was trained "
                "with model.moe.normalize_top_k=false, so its exported logits would differ"
            )
    _check_router(cfg, arch.removesuffix("ForCausalLM"))
    return arch


# ---- ours -> transformers configs -----------------------------------------------------------------
def _common_config(cfg: ModelConfig, tokenizer: Any | None) -> dict[str, Any]:
    return {
        **decoder_config(cfg, tokenizer),
        "hidden_act": "silu",
        "rope_parameters": rope_parameters_for_hf(cfg.rope_theta, cfg.rope_scaling),
        "sliding_window": cfg.sliding_window,
    }


def _sparse_layers(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "decoder_sparse_step": cfg.moe_every,
        "mlp_only_layers": sorted(cfg.mlp_only_layers),
        "intermediate_size": cfg.dense_ffn_size,  # dense layers
        "moe_intermediate_size": cfg.ffn_hidden_size,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": cfg.moe.normalize_top_k,
        "router_aux_loss_coef": aux_coef(cfg),
        "output_router_logits": False,
    }


def to_mixtral_config(model_cfg: ModelConfig, tokenizer: Any | None = None):
    """A ``transformers.MixtralConfig`` for ``model_cfg`` (an MoE FFN in every layer).

    Warns (``UserWarning``) when the model was trained with a capacity factor: transformers runs
    dropless. ``router_aux_loss_coef`` follows ``aux_coef`` (moetrain/hf/common.py); ``router_jitter_noise`` copies
    ``moe.jitter_eps`` (transformers applies it to the expert inputs as well as the router's).
    """
    from transformers import MixtralConfig

    if model_cfg.num_experts == 0:
        raise ValueError(
            "Mixtral has an MoE FFN in every layer; this is a dense model (model.num_experts=0): "
            "export it as MistralForCausalLM (moetrain.hf.to_hf_config)"
        )
    if hf_architecture(model_cfg) != "MixtralForCausalLM":
        raise ValueError(
            f"this model exports as {hf_architecture(model_cfg)}, not Mixtral (moetrain.hf.to_hf_config)"
        )
    warn_capacity(model_cfg)
    return MixtralConfig(
        **_common_config(model_cfg, tokenizer),
        intermediate_size=model_cfg.ffn_hidden_size,
        num_local_experts=model_cfg.num_experts,
        num_experts_per_tok=model_cfg.top_k,
        output_router_logits=False,
        router_aux_loss_coef=aux_coef(model_cfg),
        router_jitter_noise=model_cfg.moe.jitter_eps,
    )


def to_mistral_config(model_cfg: ModelConfig, tokenizer: Any | None = None):
    """A ``transformers.MistralConfig`` for a fully dense model (``num_experts == 0``)."""
    from transformers import MistralConfig

    if model_cfg.num_experts != 0:
        raise ValueError(
            f"MistralForCausalLM is dense; this model has model.num_experts={model_cfg.num_experts}"
        )
    return MistralConfig(**_common_config(model_cfg, tokenizer), intermediate_size=model_cfg.dense_ffn_size)


def _to_qwen3_config(cfg: ModelConfig, tokenizer: Any | None):
    from transformers import Qwen3Config

    common = _common_config(cfg, tokenizer)
    window = common.pop("sliding_window")
    return Qwen3Config(
        **common,
        intermediate_size=cfg.dense_ffn_size,
        attention_bias=False,
        use_sliding_window=window is not None,
        sliding_window=window,
        max_window_layers=0,  # the window applies to every layer, as here
    )


def _to_olmoe_config(cfg: ModelConfig, tokenizer: Any | None):
    from transformers import OlmoeConfig

    common = _common_config(cfg, tokenizer)
    del common["head_dim"], common["sliding_window"]  # OLMoE has neither (checked by hf_architecture)
    warn_capacity(cfg)
    return OlmoeConfig(
        **common,
        intermediate_size=cfg.ffn_hidden_size,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=cfg.moe.normalize_top_k,
        router_aux_loss_coef=aux_coef(cfg),
        output_router_logits=False,
        attention_bias=False,
        clip_qkv=None,
    )


def _to_qwen2_moe_config(cfg: ModelConfig, tokenizer: Any | None):
    from transformers import Qwen2MoeConfig

    common = _common_config(cfg, tokenizer)
    del common["sliding_window"]
    warn_capacity(cfg)
    return Qwen2MoeConfig(
        **common,
        **_sparse_layers(cfg),
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
        qkv_bias=cfg.attention_bias,
        use_sliding_window=False,
    )


def _to_qwen3_moe_config(cfg: ModelConfig, tokenizer: Any | None):
    from transformers import Qwen3MoeConfig

    common = _common_config(cfg, tokenizer)
    window = common.pop("sliding_window")
    warn_capacity(cfg)
    return Qwen3MoeConfig(
        **common,
        **_sparse_layers(cfg),
        attention_bias=False,
        use_sliding_window=window is not None,
        sliding_window=window,
    )


_TO_CONFIG = {
    "MixtralForCausalLM": to_mixtral_config,
    "MistralForCausalLM": to_mistral_config,
    "Qwen3ForCausalLM": _to_qwen3_config,
    "OlmoeForCausalLM": _to_olmoe_config,
    "Qwen2MoeForCausalLM": _to_qwen2_moe_config,
    "Qwen3MoeForCausalLM": _to_qwen3_moe_config,
}


for _arch in deepseek.ARCHITECTURES:
    _TO_CONFIG[_arch] = deepseek.to_hf_config
_TO_CONFIG[gpt_oss.ARCHITECTURE] = gpt_oss.to_hf_config


def to_hf_config(model_cfg: ModelConfig, tokenizer: Any | None = None):
    """The transformers config of ``hf_architecture(model_cfg)``; ``ValueError`` when none holds it."""
    return _TO_CONFIG[hf_architecture(model_cfg)](model_cfg, tokenizer)


# ---- transformers configs -> ours -----------------------------------------------------------------
def _unsupported(hf_config: Any, what: str) -> None:
    raise ValueError(f"{hf_config.model_type}: {what} is not supported")


def from_hf_config(hf_config: Any) -> ModelConfig:
    """Our ``ModelConfig`` for a transformers config of one of the families above (to train it here).

    The MoE settings mirror transformers' training: the ``mixtral`` balance loss (all four MoE
    families use it) weighted by ``router_aux_loss_coef``, no z-loss, dropless; top-k renormalised
    as the family does (Mixtral always; the others per ``norm_topk_prob``).
    """
    t = getattr(hf_config, "model_type", None)
    if t in deepseek.DEEPSEEK_FAMILIES:
        return deepseek.from_hf_config(hf_config)
    if t == "gpt_oss":
        return gpt_oss.from_hf_config(hf_config)
    if t not in MOE_FAMILIES + DENSE_FAMILIES:
        families = MOE_FAMILIES + deepseek.DEEPSEEK_FAMILIES + ("gpt_oss",) + DENSE_FAMILIES
        raise ValueError(f"model_type={t!r} is not supported: one of {', '.join(families)}")
    require_silu(hf_config)
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_scaling = rope_scaling_from_hf(rope, t)
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None) or hf_config.default_theta)
    fields = decoder_fields(hf_config)
    if t in ("llama", "qwen3", "olmoe", "qwen3_moe") and getattr(hf_config, "attention_bias", False):
        _unsupported(hf_config, "attention_bias=true (a bias on the output projection too)")
    if t == "llama" and getattr(hf_config, "mlp_bias", False):
        _unsupported(hf_config, "mlp_bias=true")
    if t in ("qwen2_moe", "qwen3") and getattr(hf_config, "use_sliding_window", False):
        _unsupported(hf_config, "use_sliding_window=true (a window on some layers only)")
    window = getattr(hf_config, "sliding_window", None) or None  # Qwen2-MoE stores 0 for "none"
    if t == "qwen2_moe":
        window = None
    if t in ("qwen3", "qwen3_moe"):
        fields["qk_norm"] = "per_head"
    if t == "olmoe":
        if getattr(hf_config, "clip_qkv", None) is not None:
            _unsupported(hf_config, f"clip_qkv={hf_config.clip_qkv}")
        fields.update(qk_norm="full", head_dim=None)
    moe = MoEConfig()
    num_experts, top_k, ffn = 0, 2, hf_config.intermediate_size
    if t in MOE_FAMILIES:
        top_k = hf_config.num_experts_per_tok
        num_experts = hf_config.num_local_experts if t == "mixtral" else hf_config.num_experts
        moe = MoEConfig(
            aux_loss_weight=hf_config.router_aux_loss_coef,
            aux_loss_type="mixtral",
            z_loss_weight=0.0,
            normalize_top_k=True if t == "mixtral" else bool(hf_config.norm_topk_prob),
            jitter_eps=float(getattr(hf_config, "router_jitter_noise", 0.0) or 0.0),
        )
    if t in ("qwen2_moe", "qwen3_moe"):
        ffn = hf_config.moe_intermediate_size
        fields.update(
            dense_ffn_hidden_size=hf_config.intermediate_size,
            moe_every=hf_config.decoder_sparse_step,
            mlp_only_layers=sorted(hf_config.mlp_only_layers or []),
        )
    if t == "qwen2_moe":
        if not hf_config.shared_expert_intermediate_size:
            _unsupported(hf_config, "shared_expert_intermediate_size=0")
        fields.update(
            attention_bias=bool(hf_config.qkv_bias),
            shared_expert_intermediate_size=hf_config.shared_expert_intermediate_size,
            shared_expert_gate=True,
        )
    cfg = ModelConfig(
        ffn_hidden_size=ffn,
        num_experts=num_experts,
        top_k=top_k,
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        sliding_window=window,
        moe=moe,
        **fields,
    )
    cfg.validate()
    return cfg
