"""moetrain <-> transformers for gpt-oss (GptOssForCausalLM), and its MXFP4 expert weights.

What gpt-oss adds to the decoder of moetrain/hf/config.py, as model options:

    transformers (config.json)          ours
    attention_bias (q, k, v and o)      attention_bias, attention_out_bias
    self_attn.sinks                     attention_sinks (a learned sink logit per head)
    layer_types, sliding_window         layer_types, sliding_window
    rope_parameters (yarn)              rope_scaling (moetrain/model/rope.py)
    router bias; softmax of the top-k   moe.router_bias; softmax + normalize_top_k (the same weights)
    expert biases                       moe.expert_proj_bias
    swiglu_alpha, swiglu_limit          moe.expert_activation=clamped_swiglu, moe.swiglu_alpha, moe.swiglu_limit

Tensor names and layouts (in memory; the checkpoints on disk hold the expert weights as MXFP4
``*_blocks`` / ``*_scales``, dequantised on load by ``dequantize_mxfp4``):

    layers.i.attention.o_proj.bias, .sinks      model.layers.i.self_attn.o_proj.bias, .sinks
    layers.i.ffn.router.gate.{weight,bias}      model.layers.i.mlp.router.{weight,bias}
    layers.i.ffn.experts.w1, v1   [E, F, H]     model.layers.i.mlp.experts.gate_up_proj [E, H, 2F]
                                                  (gate = columns 0::2, up = columns 1::2: interleaved)
    layers.i.ffn.experts.w1_bias, v1_bias [E,F] model.layers.i.mlp.experts.gate_up_proj_bias [E, 2F] (interleaved)
    layers.i.ffn.experts.w2       [E, F, H]     model.layers.i.mlp.experts.down_proj [E, F, H] (as is)
    layers.i.ffn.experts.w2_bias  [E, H]        model.layers.i.mlp.experts.down_proj_bias [E, H]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.hf.common import aux_coef, decoder_config, decoder_fields, refuse, warn_capacity
from moetrain.model.rope import rope_parameters_for_hf, rope_scaling_from_hf

ARCHITECTURE = "GptOssForCausalLM"

# Per-layer names (transformers' -> ours, part): parts how moetrain/hf/state.py's KeySpec and moetrain/pretrained.py read them.
#   stack: [E, ...] by expert, as is; gate_up: [E, H, 2F] interleaved -> w1, v1 (transposed);
#   gate_up_bias: [E, 2F] interleaved -> w1_bias, v1_bias; mxfp4_gate_up / mxfp4_down: MXFP4 blocks of
#   gate_up_proj / down_proj, dequantised with their scales (mxfp4_scales: read with the blocks).
LAYER_SPECS = {
    "mlp.router.weight": ("ffn.router.gate.weight", "copy"),
    "mlp.router.bias": ("ffn.router.gate.bias", "copy"),
    "mlp.experts.gate_up_proj": ("ffn.experts.w1", "gpt_oss_gate_up"),
    "mlp.experts.gate_up_proj_bias": ("ffn.experts.w1_bias", "gpt_oss_gate_up_bias"),
    "mlp.experts.down_proj": ("ffn.experts.w2", "gpt_oss_stack"),
    "mlp.experts.down_proj_bias": ("ffn.experts.w2_bias", "gpt_oss_stack"),
    "mlp.experts.gate_up_proj_blocks": ("ffn.experts.w1", "gpt_oss_mxfp4_gate_up"),
    "mlp.experts.gate_up_proj_scales": ("ffn.experts.w1", "gpt_oss_mxfp4_scales"),
    "mlp.experts.down_proj_blocks": ("ffn.experts.w2", "gpt_oss_mxfp4_down"),
    "mlp.experts.down_proj_scales": ("ffn.experts.w2", "gpt_oss_mxfp4_scales"),
}
PARTS = {part for _, part in LAYER_SPECS.values() if part != "copy"}

# The E2M1 values of the 16 FP4 codes (OCP Microscaling spec): sign bit 3, then 2 exponent and 1 mantissa bits.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """MXFP4 -> ``dtype``: ``blocks`` [E, R, G, 16] uint8 (two 4-bit codes per byte, low nibble first),
    ``scales`` [E, R, G] uint8 (a shared power of two per 32 values, biased by 127). Returns
    [E, G * 32, R]: the transposed layout the in-memory gate_up_proj / down_proj have."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).to(torch.int64)  # [..., G, 16, 2]: low nibble first
    values = lut[codes].flatten(-2)  # [E, R, G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1).to(torch.float32))
    E, R, G, _ = values.shape
    return values.reshape(E, R, G * 32).transpose(1, 2).to(dtype).contiguous()


def key_spec(rest: str) -> tuple[str, str] | None:
    """(our per-layer name, part) of a gpt-oss per-layer name, or None when moetrain/hf/state.py's mapping holds it."""
    return LAYER_SPECS.get(rest)


def file_shape(part: str, name: str, full: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the file holds for ``part`` given our full tensor's shape ``full``."""
    if part == "gpt_oss_gate_up":  # w1 [E, F, H] -> [E, H, 2F]
        return (full[0], full[2], 2 * full[1])
    if part == "gpt_oss_gate_up_bias":  # w1_bias [E, F] -> [E, 2F]
        return (full[0], 2 * full[1])
    if part == "gpt_oss_stack":
        return full
    E, F, H = full
    rows, cols = (2 * F, H) if "gate_up" in name else (H, F)
    if part == "gpt_oss_mxfp4_scales":
        return (E, rows, cols // 32)
    return (E, rows, cols // 32, 16)


def filled(part: str, ours: str) -> tuple[str, ...]:
    """Our tensors a file tensor of ``part`` fills."""
    if part in ("gpt_oss_gate_up", "gpt_oss_mxfp4_gate_up"):
        return (ours, ours.replace(".w1", ".v1"))
    if part == "gpt_oss_gate_up_bias":
        return (ours, ours.replace(".w1_bias", ".v1_bias"))
    if part == "gpt_oss_mxfp4_scales":
        return ()
    return (ours,)


def _split_gate_up(t_EHF2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t_EHF2[..., 0::2].transpose(1, 2), t_EHF2[..., 1::2].transpose(1, 2)


def read_experts(
    part: str, name: str, ours: str, get_slice: Callable[[str], Any], lo: int, hi: int
) -> dict[str, torch.Tensor]:
    """Experts ``lo:hi`` of file tensor ``name`` in our names and layout (``get_slice(name)``: the
    safetensors slice of a file tensor, wherever it is stored)."""
    if part == "gpt_oss_mxfp4_scales":
        return {}
    if part.startswith("gpt_oss_mxfp4"):
        blocks = get_slice(name)[lo:hi]
        scales = get_slice(name.replace("_blocks", "_scales"))[lo:hi]
        t = dequantize_mxfp4(blocks, scales)
        if part == "gpt_oss_mxfp4_down":
            return {ours: t}  # [El, F, H]
        w1, v1 = _split_gate_up(t)
        return {ours: w1, ours.replace(".w1", ".v1"): v1}
    t = get_slice(name)[lo:hi]
    if part == "gpt_oss_gate_up":
        w1, v1 = _split_gate_up(t)
        return {ours: w1, ours.replace(".w1", ".v1"): v1}
    if part == "gpt_oss_gate_up_bias":
        return {ours: t[:, 0::2], ours.replace(".w1_bias", ".v1_bias"): t[:, 1::2]}
    return {ours: t}


# Our per-layer names gpt-oss names its own way (the experts go through fuse_experts).
LAYER_RENAMES = {"ffn.router.gate.weight": "mlp.router.weight", "ffn.router.gate.bias": "mlp.router.bias"}


def fuse_experts(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our per-layer expert tensors -> gpt-oss's (interleaved gate / up)."""
    need = {"w1", "v1", "w2", "w1_bias", "v1_bias", "w2_bias"}
    if set(w) != need:
        raise ValueError(f"gpt-oss experts need {sorted(need)}, found {sorted(w)}")
    E, F, H = w["w1"].shape
    gate_up = torch.stack([w["w1"], w["v1"]], dim=2).reshape(E, 2 * F, H).transpose(1, 2).contiguous()
    gate_up_bias = torch.stack([w["w1_bias"], w["v1_bias"]], dim=2).reshape(E, 2 * F)
    return {
        "mlp.experts.gate_up_proj": gate_up,
        "mlp.experts.gate_up_proj_bias": gate_up_bias,
        "mlp.experts.down_proj": w["w2"].contiguous(),
        "mlp.experts.down_proj_bias": w["w2_bias"].contiguous(),
    }


def architecture(cfg: ModelConfig) -> str:
    """gpt-oss (a model with attention sinks), or a one-line ``ValueError`` naming what it cannot hold."""
    moe = cfg.moe
    needs = {
        "model.attention_bias": cfg.attention_bias,
        "model.attention_out_bias": cfg.attention_out_bias,
        "model.moe.router_bias": moe.router_bias,
        "model.moe.expert_proj_bias": moe.expert_proj_bias,
        "model.moe.expert_activation=clamped_swiglu": moe.expert_activation == "clamped_swiglu",
        "model.moe.normalize_top_k": moe.normalize_top_k,
        "model.moe.score_function=softmax": moe.score_function == "softmax",
        "an MoE FFN in every layer": cfg.num_experts > 0 and len(cfg.moe_layer_ids) == cfg.num_layers,
    }
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        refuse(f"{ARCHITECTURE} (a model with attention sinks) needs {', '.join(missing)}")
    extra = {
        "model.qk_norm": cfg.qk_norm != "none",
        "model.shared_expert_intermediate_size": cfg.shared_expert_intermediate_size > 0,
        "model.partial_rotary_factor": cfg.partial_rotary_factor != 1.0,
        "model.moe.n_group": moe.n_group > 1,
        "model.moe.routed_scaling_factor": moe.routed_scaling_factor != 1.0,
        "model.moe.selection_bias / bias_update_rate": moe.selection_bias or moe.bias_update_rate > 0,
    }
    found = [k for k, bad in extra.items() if bad]
    if found:
        refuse(f"{ARCHITECTURE} has none of {', '.join(found)}; this model sets them")
    return ARCHITECTURE


def to_hf_config(cfg: ModelConfig, tokenizer: Any | None = None):
    from transformers import GptOssConfig

    architecture(cfg)
    warn_capacity(cfg)
    types = (
        list(cfg.layer_types)
        or ["sliding_attention" if cfg.sliding_window is not None else "full_attention"] * cfg.num_layers
    )
    return GptOssConfig(
        **decoder_config(cfg, tokenizer),
        intermediate_size=cfg.ffn_hidden_size,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        rope_parameters=rope_parameters_for_hf(cfg.rope_theta, cfg.rope_scaling),
        sliding_window=cfg.sliding_window,
        layer_types=types,
        attention_bias=True,
        swiglu_alpha=cfg.moe.swiglu_alpha,
        swiglu_limit=cfg.moe.swiglu_limit,
        router_aux_loss_coef=aux_coef(cfg),
        output_router_logits=False,
    )


def from_hf_config(hf_config: Any) -> ModelConfig:
    """Our ``ModelConfig`` for a gpt-oss config (Mixtral's balance loss at ``router_aux_loss_coef``, as
    transformers trains it; no z-loss)."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    types = list(hf_config.layer_types or [])
    window = hf_config.sliding_window if "sliding_attention" in types else None
    if types and all(t == "sliding_attention" for t in types):
        types = []  # the window on every layer: the plain option
    cfg = ModelConfig(
        **decoder_fields(hf_config),
        ffn_hidden_size=hf_config.intermediate_size,
        num_experts=hf_config.num_local_experts,
        top_k=hf_config.num_experts_per_tok,
        rope_theta=float(rope.get("rope_theta", hf_config.default_theta)),
        rope_scaling=rope_scaling_from_hf(rope, "gpt_oss"),  # the released checkpoints: YaRN, factor 32
        sliding_window=window,
        layer_types=types,
        attention_bias=bool(hf_config.attention_bias),
        attention_out_bias=bool(hf_config.attention_bias),
        attention_sinks=True,
        moe=MoEConfig(
            aux_loss_weight=hf_config.router_aux_loss_coef,
            aux_loss_type="mixtral",
            z_loss_weight=0.0,
            normalize_top_k=True,
            router_bias=True,
            expert_proj_bias=True,
            expert_activation="clamped_swiglu",
            swiglu_alpha=float(hf_config.swiglu_alpha),
            swiglu_limit=float(hf_config.swiglu_limit),
        ),
    )
    cfg.validate()
    return cfg
