"""moetrain <-> transformers: configs and weights of Mixtral (MoE) and Mistral (dense) models.

Our decoder is Mixtral's, so export is a renaming plus two reshapes of the fused experts:

    ours (MoETransformer.state_dict())          transformers 5.x, in memory
    embed.weight                                model.embed_tokens.weight
    layers.i.attention_norm.weight              model.layers.i.input_layernorm.weight
    layers.i.attention.{q,k,v,o}_proj.weight    model.layers.i.self_attn.{q,k,v,o}_proj.weight
    layers.i.ffn_norm.weight                    model.layers.i.post_attention_layernorm.weight
    layers.i.ffn.router.gate.weight   [E, H]    model.layers.i.mlp.gate.weight        [E, H]
    layers.i.ffn.experts.w1, .v1      [E, F, H] model.layers.i.mlp.experts.gate_up_proj [E, 2F, H]
                                                  (= cat(w1, v1) along F: gate rows, then up rows)
    layers.i.ffn.experts.w2           [E, F, H] model.layers.i.mlp.experts.down_proj  [E, H, F] (= w2^T)
    layers.i.ffn.w1 / w3 / w2 (dense)           model.layers.i.mlp.gate_proj / up_proj / down_proj
    norm.weight                                 model.norm.weight
    lm_head.weight                              lm_head.weight

``save_pretrained`` then writes Mixtral's classic per-expert file names
(``block_sparse_moe.experts.{e}.w1/w2/w3``, ``block_sparse_moe.gate``); ``from_mixtral_state_dict``
reads both those and the in-memory names, so a downloaded Mixtral checkpoint can be fine-tuned here.

What the other side cannot express is refused with a one-line ``ValueError``: on export, dense layers
between MoE layers (a fully dense model exports as ``MistralForCausalLM`` instead), top-k weights
that are not renormalised, sigmoid router scores (``model.moe.score_function=sigmoid``) and the
aux-loss-free expert-selection bias (``model.moe.bias_update_rate > 0``; ``moetrain.export
--drop-expert-bias`` exports without it, with a warning, because Mixtral then routes differently); on import, activations other than SiLU and scaled RoPE variants.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from moetrain.config import ModelConfig, MoEConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Per-layer names that only change prefix (ours -> transformers').
_LAYER_RENAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.k_proj.weight": "self_attn.k_proj.weight",
    "attention.v_proj.weight": "self_attn.v_proj.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "ffn.router.gate.weight": "mlp.gate.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",  # dense SwiGLU (Mistral/Llama MLP)
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_RENAMES_INV = {v: k for k, v in _LAYER_RENAMES.items()}
_TOP_RENAMES_INV = {v: k for k, v in _TOP_RENAMES.items()}


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that holds ``cfg`` exactly, or a one-line ``ValueError`` saying why none does."""
    if cfg.num_experts == 0:
        return "MistralForCausalLM"
    if cfg.moe_every > 1:
        raise ValueError(
            f"Mixtral has an MoE FFN in every layer; this model has model.moe_every={cfg.moe_every} "
            "(dense layers in between), which no transformers architecture expresses; only fully MoE "
            "(moe_every=1) or fully dense (num_experts=0, as MistralForCausalLM) models export"
        )
    if not cfg.moe.normalize_top_k:
        raise ValueError(
            "transformers' Mixtral always renormalises the top-k router weights; this model was trained "
            "with model.moe.normalize_top_k=false, so its exported logits would differ"
        )
    if cfg.moe.score_function != "softmax":
        raise ValueError(
            "transformers' Mixtral scores experts with a softmax; this model was trained with "
            f"model.moe.score_function={cfg.moe.score_function} (DeepSeek-V3 routing), which it cannot hold, "
            "so its exported routing and logits would differ"
        )
    if cfg.moe.bias_update_rate > 0:
        raise ValueError(
            "transformers' Mixtral has no expert-selection bias; this model was trained with aux-loss-free "
            f"balancing (model.moe.bias_update_rate={cfg.moe.bias_update_rate}), so its exported routing would "
            "differ; pass --drop-expert-bias to export without the bias anyway"
        )
    return "MixtralForCausalLM"


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
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        **_special_ids(tokenizer),
    }


def to_mixtral_config(model_cfg: ModelConfig, tokenizer: Any | None = None):
    """A ``transformers.MixtralConfig`` for ``model_cfg`` (an MoE FFN in every layer).

    Warns (``UserWarning``) when the model was trained with a capacity factor: transformers runs
    dropless, so logits differ wherever our model dropped tokens. ``router_aux_loss_coef`` is chosen so
    that fine-tuning in transformers weighs the balance loss as our training did: our weight for
    ``aux_loss_type=mixtral`` (the same formula), our weight / top_k for ``switch`` (Mixtral's loss is
    top_k times Switch's for one layer). ``router_jitter_noise`` copies ``moe.jitter_eps``;
    transformers applies it to the expert inputs as well as the router's (training only).
    """
    from transformers import MixtralConfig

    if hf_architecture(model_cfg) != "MixtralForCausalLM":
        raise ValueError(
            "Mixtral has an MoE FFN in every layer; this is a dense model (model.num_experts=0): "
            "export it as MistralForCausalLM (moetrain.hf.to_hf_config)"
        )
    moe = model_cfg.moe
    if moe.capacity_factor is not None:
        warnings.warn(
            f"model.moe.capacity_factor={moe.capacity_factor}: transformers' Mixtral runs dropless, so its "
            "logits differ from ours wherever our model dropped tokens",
            UserWarning,
            stacklevel=2,
        )
    coef = moe.aux_loss_weight if moe.aux_loss_type == "mixtral" else moe.aux_loss_weight / model_cfg.top_k
    return MixtralConfig(
        **_common_config(model_cfg, tokenizer),
        intermediate_size=model_cfg.ffn_hidden_size,
        num_local_experts=model_cfg.num_experts,
        num_experts_per_tok=model_cfg.top_k,
        output_router_logits=False,
        router_aux_loss_coef=coef,
        router_jitter_noise=moe.jitter_eps,
    )


def to_mistral_config(model_cfg: ModelConfig, tokenizer: Any | None = None):
    """A ``transformers.MistralConfig`` for a fully dense model (``num_experts == 0``)."""
    from transformers import MistralConfig

    if model_cfg.num_experts != 0:
        raise ValueError(
            f"MistralForCausalLM is dense; this model has model.num_experts={model_cfg.num_experts}"
        )
    return MistralConfig(**_common_config(model_cfg, tokenizer), intermediate_size=model_cfg.dense_ffn_size)


def to_hf_config(model_cfg: ModelConfig, tokenizer: Any | None = None):
    """MixtralConfig for MoE models, MistralConfig for dense ones; ``ValueError`` for interleaved ones."""
    if hf_architecture(model_cfg) == "MistralForCausalLM":
        return to_mistral_config(model_cfg, tokenizer)
    return to_mixtral_config(model_cfg, tokenizer)


def to_mixtral_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``MoETransformer.state_dict()`` (or a checkpoint's model.safetensors) in transformers' names.

    Loads with ``strict=True`` into a fresh ``MixtralForCausalLM`` (MoE layers) or ``MistralForCausalLM``
    (dense layers). A missing ``lm_head.weight`` (tied embeddings, dropped from checkpoint files) is
    filled in from the embedding, as transformers' own state dict lists it even when tied.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = t
            continue
        m = _LAYER.match(name)
        if m is None:
            raise ValueError(f"unexpected parameter {name!r}: not a MoETransformer state dict")
        i, rest = int(m.group(1)), m.group(2)
        if rest in _LAYER_RENAMES:
            out[f"model.layers.{i}.{_LAYER_RENAMES[rest]}"] = t
        elif rest in ("ffn.experts.w1", "ffn.experts.v1", "ffn.experts.w2"):
            experts.setdefault(i, {})[rest.rsplit(".", 1)[1]] = t
        else:
            raise ValueError(f"unexpected parameter {name!r}: not a MoETransformer state dict")
    for i, w in sorted(experts.items()):
        if set(w) != {"w1", "v1", "w2"}:
            raise ValueError(f"layer {i}: experts need w1, v1 and w2, found {sorted(w)}")
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["v1"]], dim=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = w["w2"].transpose(1, 2).contiguous()
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


_DISK_EXPERT = re.compile(r"^(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def from_mixtral_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Mixtral/Mistral weights in our names (the inverse of ``to_mixtral_state_dict``).

    Accepts the in-memory names of transformers 5.x (``mlp.experts.gate_up_proj``) and the names in
    Mixtral's safetensors files (``block_sparse_moe.experts.{e}.w1/w2/w3.weight``,
    ``block_sparse_moe.gate.weight``). Always returns ``lm_head.weight`` (the embedding when tied).
    """
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for name, t in state.items():
        if name in _TOP_RENAMES_INV:
            out[_TOP_RENAMES_INV[name]] = t
            continue
        m = _HF_LAYER.match(name)
        if m is None:
            raise ValueError(f"unexpected parameter {name!r}: not a Mixtral/Mistral state dict")
        i, rest = int(m.group(1)), m.group(2).replace("block_sparse_moe.", "mlp.")
        if rest in _LAYER_RENAMES_INV:
            out[f"layers.{i}.{_LAYER_RENAMES_INV[rest]}"] = t
        elif rest == "mlp.experts.gate_up_proj":
            F = t.shape[1] // 2
            out[f"layers.{i}.ffn.experts.w1"] = t[:, :F].contiguous()
            out[f"layers.{i}.ffn.experts.v1"] = t[:, F:].contiguous()
        elif rest == "mlp.experts.down_proj":
            out[f"layers.{i}.ffn.experts.w2"] = t.transpose(1, 2).contiguous()
        elif (e := _DISK_EXPERT.match(rest)) is not None:
            per_expert.setdefault(i, {}).setdefault(e.group(2), {})[int(e.group(1))] = t
        else:
            raise ValueError(f"unexpected parameter {name!r}: not a Mixtral/Mistral state dict")
    for i, by_kind in sorted(per_expert.items()):
        if set(by_kind) != {"w1", "w2", "w3"}:
            raise ValueError(f"layer {i}: experts need w1, w2 and w3, found {sorted(by_kind)}")
        E = len(by_kind["w1"])
        for kind, ours, transpose in (("w1", "w1", False), ("w3", "v1", False), ("w2", "w2", True)):
            if sorted(by_kind[kind]) != list(range(E)):
                raise ValueError(f"layer {i}: expert {kind} weights are not numbered 0..{E - 1}")
            ws = [by_kind[kind][e].t() if transpose else by_kind[kind][e] for e in range(E)]
            out[f"layers.{i}.ffn.experts.{ours}"] = torch.stack(ws).contiguous()
    if "lm_head.weight" not in out and "embed.weight" in out:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def from_hf_config(hf_config: Any) -> ModelConfig:
    """Our ``ModelConfig`` for a transformers Mixtral or Mistral config (to fine-tune it here).

    The MoE settings mirror transformers' training: the ``mixtral`` balance loss weighted by
    ``router_aux_loss_coef``, no z-loss, dropless, renormalised top-k.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ("mixtral", "mistral"):
        raise ValueError(f"model_type={model_type!r} is not supported: only 'mixtral' and 'mistral'")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r} is not supported: only 'silu'")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope['rope_type']!r} is not supported: only 'default' RoPE")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None) or hf_config.default_theta)
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim == hf_config.hidden_size // hf_config.num_attention_heads:
        head_dim = None
    moe = MoEConfig()
    num_experts, top_k = 0, 2
    if model_type == "mixtral":
        num_experts, top_k = hf_config.num_local_experts, hf_config.num_experts_per_tok
        moe = MoEConfig(
            aux_loss_weight=hf_config.router_aux_loss_coef,
            aux_loss_type="mixtral",
            z_loss_weight=0.0,
            normalize_top_k=True,
            jitter_eps=float(hf_config.router_jitter_noise or 0.0),
        )
    cfg = ModelConfig(
        name=getattr(hf_config, "_name_or_path", None) or model_type,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        head_dim=head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        num_experts=num_experts,
        top_k=top_k,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(theta),
        sliding_window=hf_config.sliding_window,
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
        moe=moe,
    )
    cfg.validate()
    return cfg


def hf_model_from_state(model_cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Any | None = None):
    """A transformers model (eval mode) for ``model_cfg`` holding ``state`` (our names), in ``state``'s dtype."""
    import transformers
    from transformers.initialization import no_init_weights

    hf_cfg = to_hf_config(model_cfg, tokenizer)
    cls = getattr(transformers, hf_architecture(model_cfg))
    with no_init_weights():  # every weight is overwritten below: skip the random init
        hf_model = cls(hf_cfg)
    hf_model.tie_weights()
    hf_model.to(state["embed.weight"].dtype)
    hf_model.load_state_dict(to_mixtral_state_dict(state), strict=True)
    return hf_model.eval()


def to_hf_model(model: Any, tokenizer: Any | None = None):
    """A transformers ``MixtralForCausalLM`` / ``MistralForCausalLM`` holding ``model``'s weights (eval mode)."""
    return hf_model_from_state(model.cfg, model.state_dict(), tokenizer)


__all__ = [
    "from_hf_config",
    "from_mixtral_state_dict",
    "hf_architecture",
    "hf_model_from_state",
    "to_hf_config",
    "to_hf_model",
    "to_mistral_config",
    "to_mixtral_config",
    "to_mixtral_state_dict",
]
