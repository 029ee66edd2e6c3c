"""Weights: our state-dict names <-> transformers' (the mapping in moetrain/hf/__init__.py), in memory and
on disk, and a transformers model holding our weights."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from moetrain.config import ModelConfig
from moetrain.hf import deepseek, gpt_oss
from moetrain.hf.config import hf_architecture, to_hf_config

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


def family_layer_renames(arch: str | None) -> dict[str, str]:
    """Our per-layer names that the family of class ``arch`` names its own way (ours -> transformers');
    the rest follow ``_LAYER_RENAMES``."""
    if arch in deepseek.ARCHITECTURES:
        return deepseek.LAYER_RENAMES
    if arch == gpt_oss.ARCHITECTURE:
        return gpt_oss.LAYER_RENAMES
    return {}


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
    family = family_layer_renames(arch)
    is_gpt_oss = arch == gpt_oss.ARCHITECTURE
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
            is_gpt_oss and rest.startswith("ffn.experts.")
        ):
            experts.setdefault(i, {})[rest.rsplit(".", 1)[1]] = t
        else:
            raise ValueError(f"unexpected parameter {name!r}: not a MoETransformer state dict")
    for i, w in sorted(experts.items()):
        if is_gpt_oss:
            out.update({f"model.layers.{i}.{k}": v for k, v in gpt_oss.fuse_experts(w).items()})
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
    (gpt-oss's experts, moetrain/gpt_oss.py)."""
    if name in _TOP_RENAMES_INV:
        return KeySpec(_TOP_RENAMES_INV[name])
    m = _HF_LAYER.match(name)
    if m is None:
        return None
    i, rest = int(m.group(1)), m.group(2).replace("block_sparse_moe.", "mlp.")
    if cfg is not None and cfg.attention_sinks and (gpt := gpt_oss.key_spec(rest)) is not None:
        return KeySpec(f"layers.{i}.{gpt[0]}", gpt[1])
    if rest in _LAYER_RENAMES_INV:
        return KeySpec(f"layers.{i}.{_LAYER_RENAMES_INV[rest]}")
    if rest in deepseek.LAYER_RENAMES_INV:
        return KeySpec(f"layers.{i}.{deepseek.LAYER_RENAMES_INV[rest]}")
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
        if spec.part in gpt_oss.PARTS:
            out.update(gpt_oss.read_experts(spec.part, name, spec.ours, state.__getitem__, 0, None))
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
