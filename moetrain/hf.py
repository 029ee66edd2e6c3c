"""moetrain <-> transformers: configs and weights of five families, both directions.

    family (model_type)      transformers class       what it adds to the Mixtral-style decoder
    mixtral                  MixtralForCausalLM       -
    mistral, llama (dense)   MistralForCausalLM       (no experts; Llama exports as Mistral: same function)
    qwen3 (dense)            Qwen3ForCausalLM         per-head QK-norm
    olmoe                    OlmoeForCausalLM         QK-norm over the whole q / k projection, top-k not renormalised
    qwen2_moe                Qwen2MoeForCausalLM      q/k/v bias, shared expert with a sigmoid gate, sparse-layer choice
    qwen3_moe                Qwen3MoeForCausalLM      per-head QK-norm, norm_topk_prob, sparse-layer choice

Every family names its tensors the same way in memory (transformers 5.x), so one mapping serves all:

    ours (MoETransformer.state_dict())          transformers 5.x, in memory
    embed.weight                                model.embed_tokens.weight
    layers.i.attention_norm.weight              model.layers.i.input_layernorm.weight
    layers.i.attention.{q,k,v,o}_proj.weight    model.layers.i.self_attn.{q,k,v,o}_proj.weight
    layers.i.attention.{q,k,v}_proj.bias        model.layers.i.self_attn.{q,k,v}_proj.bias      (Qwen2-MoE)
    layers.i.attention.{q,k}_norm.weight        model.layers.i.self_attn.{q,k}_norm.weight      (OLMoE, Qwen3)
    layers.i.ffn_norm.weight                    model.layers.i.post_attention_layernorm.weight
    layers.i.ffn.router.gate.weight   [E, H]    model.layers.i.mlp.gate.weight        [E, H]
    layers.i.ffn.experts.w1, .v1      [E, F, H] model.layers.i.mlp.experts.gate_up_proj [E, 2F, H]
                                                  (= cat(w1, v1) along F: gate rows, then up rows)
    layers.i.ffn.experts.w2           [E, F, H] model.layers.i.mlp.experts.down_proj  [E, H, F] (= w2^T)
    layers.i.ffn.shared_expert.{w1,w3,w2}       model.layers.i.mlp.shared_expert.{gate,up,down}_proj (Qwen2-MoE)
    layers.i.ffn.shared_expert_gate.weight      model.layers.i.mlp.shared_expert_gate.weight
    layers.i.ffn.w1 / w3 / w2 (dense)           model.layers.i.mlp.gate_proj / up_proj / down_proj
    norm.weight                                 model.norm.weight
    lm_head.weight                              lm_head.weight

On disk (``save_pretrained``, downloaded checkpoints) experts are stored one by one:
``block_sparse_moe.experts.{e}.w1/w3/w2`` (Mixtral) or ``mlp.experts.{e}.gate_proj/up_proj/down_proj``
(the others). ``hf_key_spec`` maps any of these names to ours (used to read only some experts, see
moetrain/pretrained.py); ``from_hf_state_dict`` converts a whole state dict.

Which class a model exports to follows from its options (``hf_architecture``); what no class can
express is refused with a one-line ``ValueError``: dense layers between Mixtral/OLMoE MoE layers,
un-renormalised top-k in Mixtral, sigmoid router scores, the aux-loss-free expert-selection bias
(``moetrain.export --drop-expert-bias`` exports without it, with a warning). On import: activations
other than SiLU, RoPE scalings other than linear / dynamic / llama3 / yarn (model/rope.py), and family options we do not implement (OLMoE's clip_qkv,
Qwen's per-layer sliding windows, biases on the output projection).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from moetrain import hf_deepseek, hf_gpt_oss
from moetrain.config import ModelConfig, MoEConfig
from moetrain.model.rope import rope_parameters_for_hf, rope_scaling_from_hf

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Per-layer names that only change prefix (ours -> transformers').
_LAYER_RENAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attention.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"attention.{p}_proj.bias": f"self_attn.{p}_proj.bias" for p in "qkvo"},  # o: gpt-oss
    "attention.sinks": "self_attn.sinks",  # gpt-oss
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.router.gate.weight": "mlp.gate.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",  # dense SwiGLU (Mistral/Llama/Qwen MLP)
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.shared_expert.w1.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn.shared_expert.w3.weight": "mlp.shared_expert.up_proj.weight",
    "ffn.shared_expert.w2.weight": "mlp.shared_expert.down_proj.weight",
    "ffn.shared_expert_gate.weight": "mlp.shared_expert_gate.weight",
}
_TOP_RENAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_RENAMES_INV = {v: k for k, v in _LAYER_RENAMES.items()}
_TOP_RENAMES_INV = {v: k for k, v in _TOP_RENAMES.items()}

# model_type -> what it becomes here (dense families are what sparse upcycling starts from).
MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
DENSE_FAMILIES = ("mistral", "llama", "qwen3")


# ---- which transformers class holds a model -------------------------------------------------------
def _refuse(msg: str) -> None:
    raise ValueError(msg)


def _check_router(cfg: ModelConfig, arch: str) -> None:
    if cfg.moe.score_function != "softmax":
        _refuse(
            f"transformers' {arch} scores experts with a softmax; this model was trained with "
            f"model.moe.score_function={cfg.moe.score_function} (DeepSeek-V3 routing), which it cannot hold, "
            "so its exported routing and logits would differ"
        )
    if cfg.moe.n_group > 1 or cfg.moe.routed_scaling_factor != 1.0:
        _refuse(
            f"transformers' {arch} has no group-limited routing nor routed_scaling_factor; this model uses "
            f"model.moe.n_group={cfg.moe.n_group}, routed_scaling_factor={cfg.moe.routed_scaling_factor}, so its "
            "exported routing and logits would differ"
        )
    if cfg.moe.bias_update_rate > 0 or cfg.moe.selection_bias:
        _refuse(
            f"transformers' {arch} has no expert-selection bias; this model was trained with aux-loss-free "
            f"balancing (model.moe.bias_update_rate={cfg.moe.bias_update_rate}), so its exported routing would "
            "differ; pass --drop-expert-bias to export without the bias anyway"
        )


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that holds ``cfg`` exactly, or a one-line ``ValueError`` saying why none does.

    It follows from the model's options, so a model keeps the architecture it came from: QK-norm over
    the whole projection -> OLMoE, per head -> Qwen3(-MoE), a shared expert or q/k/v bias -> Qwen2-MoE,
    none of these -> Mixtral (dense: Mistral). Sigmoid scores with an ungated shared expert: the
    DeepSeek-V3 families (moetrain/hf_deepseek.py)."""
    if hf_deepseek.is_deepseek_style(cfg):
        return hf_deepseek.architecture(cfg)
    if cfg.attention_sinks:
        return hf_gpt_oss.architecture(cfg)
    every_layer_moe = len(cfg.moe_layer_ids) == cfg.num_layers
    if cfg.num_experts == 0:
        if cfg.attention_bias:
            _refuse(
                "a dense model with model.attention_bias=true has no transformers class here (Qwen2 is not mapped)"
            )
        return {"none": "MistralForCausalLM", "per_head": "Qwen3ForCausalLM"}.get(cfg.qk_norm) or _refuse(
            "a dense model with model.qk_norm=full (OLMo-style) has no transformers class here"
        )
    if cfg.qk_norm == "full":
        arch = "OlmoeForCausalLM"
        if cfg.attention_bias or cfg.shared_expert_intermediate_size:
            _refuse(
                "OLMoE has no q/k/v bias and no shared expert: this model cannot export as OlmoeForCausalLM"
            )
        if not every_layer_moe:
            _refuse(
                f"OLMoE has an MoE FFN in every layer; this model has dense layers (model.moe_every={cfg.moe_every}, "
                f"model.mlp_only_layers={list(cfg.mlp_only_layers)})"
            )
        if cfg.head_dim not in (None, cfg.hidden_size // cfg.num_heads) or cfg.sliding_window is not None:
            _refuse("OLMoE has head_dim = hidden_size / num_heads and no sliding window; this model differs")
    elif cfg.qk_norm == "per_head":
        arch = "Qwen3MoeForCausalLM"
        if cfg.attention_bias or cfg.shared_expert_intermediate_size:
            _refuse(
                "Qwen3-MoE has no q/k/v-only bias and no shared expert: this model cannot export as Qwen3MoeForCausalLM"
            )
    elif cfg.shared_expert_intermediate_size or cfg.attention_bias:
        arch = "Qwen2MoeForCausalLM"
        if not (cfg.shared_expert_intermediate_size and cfg.shared_expert_gate):
            _refuse(
                "Qwen2-MoE always has a gated shared expert: set model.shared_expert_intermediate_size > 0 and "
                "model.shared_expert_gate=true, or drop model.attention_bias to export as Mixtral"
            )
        if cfg.sliding_window is not None:
            _refuse("Qwen2-MoE's sliding window applies to some layers only; this model has one everywhere")
    else:
        arch = "MixtralForCausalLM"
        if not every_layer_moe:
            _refuse(
                f"Mixtral has an MoE FFN in every layer; this model has model.moe_every={cfg.moe_every} "
                f"(dense layers in between; mlp_only_layers={list(cfg.mlp_only_layers)}), which no transformers "
                "architecture without QK-norm or shared experts expresses; only fully MoE (moe_every=1) or "
                "fully dense (num_experts=0, as MistralForCausalLM) models export"
            )
        if not cfg.moe.normalize_top_k:
            _refuse(
                "transformers' Mixtral always renormalises the top-k router weights; this model was trained "
                "with model.moe.normalize_top_k=false, so its exported logits would differ"
            )
    _check_router(cfg, arch.removesuffix("ForCausalLM"))
    return arch


# ---- ours -> transformers configs -----------------------------------------------------------------
def _special_ids(tokenizer: Any | None) -> dict[str, Any]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _common_config(cfg: ModelConfig, tokenizer: Any | None) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_parameters_for_hf(cfg.rope_theta, cfg.rope_scaling),
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        **_special_ids(tokenizer),
    }


def _aux_coef(cfg: ModelConfig) -> float:
    """transformers' coefficient that weighs the balance loss as our training did: our weight for
    ``aux_loss_type=mixtral`` (the same formula), our weight / top_k for ``switch`` (Mixtral's loss is
    top_k times Switch's for one layer). All four MoE families use Mixtral's loss function."""
    moe = cfg.moe
    return moe.aux_loss_weight if moe.aux_loss_type == "mixtral" else moe.aux_loss_weight / cfg.top_k


def _warn_capacity(cfg: ModelConfig) -> None:
    if cfg.moe.capacity_factor is not None:
        warnings.warn(
            f"model.moe.capacity_factor={cfg.moe.capacity_factor}: transformers runs dropless, so its "
            "logits differ from ours wherever our model dropped tokens",
            UserWarning,
            stacklevel=3,
        )


def _sparse_layers(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "decoder_sparse_step": cfg.moe_every,
        "mlp_only_layers": sorted(cfg.mlp_only_layers),
        "intermediate_size": cfg.dense_ffn_size,  # dense layers
        "moe_intermediate_size": cfg.ffn_hidden_size,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": cfg.moe.normalize_top_k,
        "router_aux_loss_coef": _aux_coef(cfg),
        "output_router_logits": False,
    }


def to_mixtral_config(model_cfg: ModelConfig, tokenizer: Any | None = None):
    """A ``transformers.MixtralConfig`` for ``model_cfg`` (an MoE FFN in every layer).

    Warns (``UserWarning``) when the model was trained with a capacity factor: transformers runs
    dropless. ``router_aux_loss_coef`` follows ``_aux_coef``; ``router_jitter_noise`` copies
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
    _warn_capacity(model_cfg)
    return MixtralConfig(
        **_common_config(model_cfg, tokenizer),
        intermediate_size=model_cfg.ffn_hidden_size,
        num_local_experts=model_cfg.num_experts,
        num_experts_per_tok=model_cfg.top_k,
        output_router_logits=False,
        router_aux_loss_coef=_aux_coef(model_cfg),
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
    _warn_capacity(cfg)
    return OlmoeConfig(
        **common,
        intermediate_size=cfg.ffn_hidden_size,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=cfg.moe.normalize_top_k,
        router_aux_loss_coef=_aux_coef(cfg),
        output_router_logits=False,
        attention_bias=False,
        clip_qkv=None,
    )


def _to_qwen2_moe_config(cfg: ModelConfig, tokenizer: Any | None):
    from transformers import Qwen2MoeConfig

    common = _common_config(cfg, tokenizer)
    del common["sliding_window"]
    _warn_capacity(cfg)
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
    _warn_capacity(cfg)
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


for _arch in hf_deepseek.ARCHITECTURES:
    _TO_CONFIG[_arch] = hf_deepseek.to_hf_config
_TO_CONFIG[hf_gpt_oss.ARCHITECTURE] = hf_gpt_oss.to_hf_config


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
    if t in hf_deepseek.DEEPSEEK_FAMILIES:
        return hf_deepseek.from_hf_config(hf_config)
    if t == "gpt_oss":
        return hf_gpt_oss.from_hf_config(hf_config)
    if t not in MOE_FAMILIES + DENSE_FAMILIES:
        families = MOE_FAMILIES + hf_deepseek.DEEPSEEK_FAMILIES + ("gpt_oss",) + DENSE_FAMILIES
        raise ValueError(f"model_type={t!r} is not supported: one of {', '.join(families)}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        _unsupported(hf_config, f"hidden_act={hf_config.hidden_act!r} (only 'silu')")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_scaling = rope_scaling_from_hf(rope, t)
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None) or hf_config.default_theta)
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim == hf_config.hidden_size // hf_config.num_attention_heads:
        head_dim = None
    fields: dict[str, Any] = {}
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
        fields["qk_norm"] = "full"
        head_dim = None
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
        name=getattr(hf_config, "_name_or_path", None) or t,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        head_dim=head_dim,
        ffn_hidden_size=ffn,
        num_experts=num_experts,
        top_k=top_k,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        sliding_window=window,
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
        moe=moe,
        **fields,
    )
    cfg.validate()
    return cfg


# ---- weights --------------------------------------------------------------------------------------
def to_hf_state_dict(state: dict[str, torch.Tensor], arch: str | None = None) -> dict[str, torch.Tensor]:
    """Our ``MoETransformer.state_dict()`` (or a checkpoint's model.safetensors) in transformers' names
    (``arch``: the class they are for, where a family names a tensor its own way).

    Loads with ``strict=True`` into a fresh model of ``hf_architecture(cfg)``. A missing
    ``lm_head.weight`` (tied embeddings, dropped from checkpoint files) is filled in from the
    embedding, as transformers' own state dict lists it even when tied. The aux-loss-free
    ``expert_bias`` buffer has no counterpart (see moetrain.export --drop-expert-bias).
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, torch.Tensor]] = {}
    family = hf_deepseek.LAYER_RENAMES if arch in hf_deepseek.ARCHITECTURES else {}
    gpt_oss = arch == hf_gpt_oss.ARCHITECTURE
    if gpt_oss:
        family = hf_gpt_oss.LAYER_RENAMES
    for name, t in state.items():
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = t
            continue
        m = _LAYER.match(name)
        if m is None:
            raise ValueError(f"unexpected parameter {name!r}: not a MoETransformer state dict")
        i, rest = int(m.group(1)), m.group(2)
        if rest in family:
            out[f"model.layers.{i}.{family[rest]}"] = t
        elif rest in _LAYER_RENAMES:
            out[f"model.layers.{i}.{_LAYER_RENAMES[rest]}"] = t
        elif rest in ("ffn.experts.w1", "ffn.experts.v1", "ffn.experts.w2") or (
            gpt_oss and rest.startswith("ffn.experts.")
        ):
            experts.setdefault(i, {})[rest.rsplit(".", 1)[1]] = t
        else:
            raise ValueError(f"unexpected parameter {name!r}: not a MoETransformer state dict")
    for i, w in sorted(experts.items()):
        if gpt_oss:
            out.update({f"model.layers.{i}.{k}": v for k, v in hf_gpt_oss.fuse_experts(w).items()})
            continue
        if set(w) != {"w1", "v1", "w2"}:
            raise ValueError(f"layer {i}: experts need w1, v1 and w2, found {sorted(w)}")
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["v1"]], dim=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = w["w2"].transpose(1, 2).contiguous()
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


# Per-expert names in checkpoint files: Mixtral's w1 (gate) / w3 (up) / w2 (down), the others' names.
_DISK_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_DISK_PART = {"w1": "w1", "gate_proj": "w1", "w3": "v1", "up_proj": "v1", "w2": "w2", "down_proj": "w2"}


@dataclass(frozen=True)
class KeySpec:
    """Where one transformers tensor goes here. ``part``:
    ``copy`` -> ``ours`` as is; ``expert`` -> ``ours[expert]`` (w1/v1 as is, w2 transposed: ``transpose``);
    ``gate_up`` -> fused [E, 2F, H]: rows :F to ``ours`` = ...experts.w1, F: to ...experts.v1;
    ``down`` -> fused [E, H, F]: ``ours`` = ...experts.w2, transposed per expert."""

    ours: str
    part: str = "copy"
    expert: int | None = None
    transpose: bool = False


def hf_key_spec(name: str, cfg: ModelConfig | None = None) -> KeySpec | None:
    """Our tensor for a transformers tensor name (in memory or on disk, any family); None if unknown.
    ``cfg``: the model it is read into, where a family lays out a name of the others its own way
    (gpt-oss's experts, moetrain/hf_gpt_oss.py)."""
    if name in _TOP_RENAMES_INV:
        return KeySpec(_TOP_RENAMES_INV[name])
    m = _HF_LAYER.match(name)
    if m is None:
        return None
    i, rest = int(m.group(1)), m.group(2).replace("block_sparse_moe.", "mlp.")
    if cfg is not None and cfg.attention_sinks and (gpt := hf_gpt_oss.key_spec(rest)) is not None:
        return KeySpec(f"layers.{i}.{gpt[0]}", gpt[1])
    if rest in _LAYER_RENAMES_INV:
        return KeySpec(f"layers.{i}.{_LAYER_RENAMES_INV[rest]}")
    if rest in hf_deepseek.LAYER_RENAMES_INV:
        return KeySpec(f"layers.{i}.{hf_deepseek.LAYER_RENAMES_INV[rest]}")
    if rest == "mlp.experts.gate_up_proj":
        return KeySpec(f"layers.{i}.ffn.experts.w1", "gate_up")
    if rest == "mlp.experts.down_proj":
        return KeySpec(f"layers.{i}.ffn.experts.w2", "down")
    e = _DISK_EXPERT.match(rest)
    if e is not None:
        part = _DISK_PART[e.group(2)]
        return KeySpec(f"layers.{i}.ffn.experts.{part}", "expert", int(e.group(1)), part == "w2")
    return None


def from_hf_state_dict(
    state: dict[str, torch.Tensor], cfg: ModelConfig | None = None
) -> dict[str, torch.Tensor]:
    """transformers weights (any family above) in our names (the inverse of ``to_hf_state_dict``).

    Accepts the in-memory names of transformers 5.x (``mlp.experts.gate_up_proj``) and the per-expert
    names of checkpoint files. Always returns ``lm_head.weight`` (the embedding when tied).
    """
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        spec = hf_key_spec(name, cfg)
        if spec is None:
            raise ValueError(f"unexpected parameter {name!r}: not a transformers model of a supported family")
        if spec.part in hf_gpt_oss.PARTS:
            out.update(hf_gpt_oss.read_experts(spec.part, name, spec.ours, state.__getitem__, 0, None))
        elif spec.part == "copy":
            out[spec.ours] = t
        elif spec.part == "gate_up":
            F = t.shape[1] // 2
            out[spec.ours] = t[:, :F].contiguous()
            out[spec.ours.replace(".w1", ".v1")] = t[:, F:].contiguous()
        elif spec.part == "down":
            out[spec.ours] = t.transpose(1, 2).contiguous()
        else:
            per_expert.setdefault(spec.ours, {})[spec.expert] = t.t() if spec.transpose else t
    for ours, by_e in sorted(per_expert.items()):
        E = len(by_e)
        if sorted(by_e) != list(range(E)):
            raise ValueError(f"{ours}: expert weights are not numbered 0..{E - 1}")
        out[ours] = torch.stack([by_e[e] for e in range(E)]).contiguous()
    layers = {int(m.group(1)) for k in per_expert if (m := _LAYER.match(k))}
    for i in sorted(layers):
        found = {k.rsplit(".", 1)[1] for k in per_expert if k.startswith(f"layers.{i}.")}
        if found != {"w1", "v1", "w2"}:
            raise ValueError(f"layer {i}: experts need gate, up and down weights, found {sorted(found)}")
    if "lm_head.weight" not in out and "embed.weight" in out:
        out["lm_head.weight"] = out["embed.weight"]
    return out


# Names of the Mixtral-only first version, kept for callers.
to_mixtral_state_dict = to_hf_state_dict
from_mixtral_state_dict = from_hf_state_dict


def hf_model_from_state(model_cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Any | None = None):
    """A transformers model (eval mode) of ``hf_architecture(model_cfg)`` holding ``state`` (our names),
    in ``state``'s dtype."""
    import transformers
    from transformers.initialization import no_init_weights

    hf_cfg = to_hf_config(model_cfg, tokenizer)
    cls = getattr(transformers, hf_architecture(model_cfg))
    with no_init_weights():  # every weight is overwritten below: skip the random init
        hf_model = cls(hf_cfg)
    hf_model.tie_weights()
    hf_model.to(state["embed.weight"].dtype)
    hf_model.load_state_dict(to_hf_state_dict(state, hf_architecture(model_cfg)), strict=True)
    return hf_model.eval()


def to_hf_model(model: Any, tokenizer: Any | None = None):
    """A transformers model of the architecture ``model`` came from, holding its weights (eval mode)."""
    return hf_model_from_state(model.cfg, model.state_dict(), tokenizer)


__all__ = [
    "DENSE_FAMILIES",
    "MOE_FAMILIES",
    "KeySpec",
    "from_hf_config",
    "from_hf_state_dict",
    "from_mixtral_state_dict",
    "hf_architecture",
    "hf_key_spec",
    "hf_model_from_state",
    "to_hf_config",
    "to_hf_model",
    "to_hf_state_dict",
    "to_mistral_config",
    "to_mixtral_config",
    "to_mixtral_state_dict",
]
