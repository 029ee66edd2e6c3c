"""Rotary position embeddings and their context-extension scalings (``model.rope_scaling``).

``model.rope_scaling`` is null (plain RoPE) or a mapping with ``rope_type`` and its fields, named as
transformers names them in ``config.rope_parameters`` (``rope_theta`` stays ``model.rope_theta``):

    rope_type   fields (required; optional)
    linear      factor                                     positions / factor (inv_freq / factor)
    dynamic     factor                                     NTK-aware base growth past max_seq_len
    llama3      factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    yarn        factor; original_max_position_embeddings (default max_seq_len), beta_fast (32),
                beta_slow (1), mscale, mscale_all_dim, attention_factor, truncate (true)

The formulas are transformers' (``modeling_rope_utils.py``, 5.x), computed the same way in fp32 so
that the tables agree to rounding: yarn's attention factor multiplies cos and sin. ``dynamic`` is a
function of the sequence length at run time: within ``max_seq_len`` it is plain RoPE (so training,
whose ``data.seq_len`` is at most ``max_seq_len``, uses it as transformers does), beyond it the base
grows with the length of the forward (generation past ``max_seq_len``), as transformers recomputes it
when a sequence grows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# The (cos, sin) tables RotaryEmbedding returns and every attention layer takes.
Rope = tuple[torch.Tensor, torch.Tensor]

# rope_type -> (required fields, optional fields)
ROPE_SCALINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (
        ("factor",),
        (
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "attention_factor",
            "truncate",
        ),
    ),
}


def validate_rope_scaling(value: Any, prefix: str = "model.rope_scaling") -> None:
    """One-line ``ConfigError`` naming the field when ``value`` is not a valid ``model.rope_scaling``."""
    from moetrain.config import ConfigError

    if value is None:
        return
    types = ", ".join(ROPE_SCALINGS)
    if not isinstance(value, dict):
        raise ConfigError(
            f"{prefix}={value!r} is invalid: null or a mapping with rope_type ({types}) and its fields"
        )
    rope_type = value.get("rope_type")
    if rope_type == "default":
        if set(value) != {"rope_type"}:
            raise ConfigError(
                f"{prefix}.rope_type=default takes no other fields (found {sorted(set(value) - {'rope_type'})})"
            )
        return
    if rope_type not in ROPE_SCALINGS:
        raise ConfigError(f"{prefix}.rope_type={rope_type!r} is invalid: one of {types} (or {prefix}=null)")
    required, optional = ROPE_SCALINGS[rope_type]
    for key in value:
        if key != "rope_type" and key not in required + optional:
            hint = " (set model.rope_theta)" if key == "rope_theta" else ""
            raise ConfigError(
                f"{prefix}.{key} is not a field of rope_type={rope_type}{hint}: "
                f"known {', '.join(required + optional)}"
            )
    for key in required:
        if value.get(key) is None:
            raise ConfigError(f"{prefix}.{key} is missing: rope_type={rope_type} needs {', '.join(required)}")

    def number(key: str, ok, allowed: str) -> None:  # noqa: ANN001
        v = value.get(key)
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ConfigError(f"{prefix}.{key}={v!r} is invalid: {allowed}")

    number("factor", lambda v: v >= 1, "a number >= 1 (the context extension)")
    number("original_max_position_embeddings", lambda v: v >= 1 and int(v) == v, "a positive integer")
    if rope_type == "llama3":
        number("low_freq_factor", lambda v: v > 0, "a number > 0")
        number("high_freq_factor", lambda v: v > value["low_freq_factor"], "a number > low_freq_factor")
    if rope_type == "yarn":
        number("beta_fast", lambda v: v > 0, "a number > 0")
        number(
            "beta_slow", lambda v: v > 0 and v < (value.get("beta_fast") or 32), "a number in (0, beta_fast)"
        )
        number("attention_factor", lambda v: v > 0, "a number > 0")
        number("mscale", lambda v: v >= 0, "a number >= 0")
        number("mscale_all_dim", lambda v: v >= 0, "a number >= 0")
        if not isinstance(value.get("truncate", True), bool):
            raise ConfigError(f"{prefix}.truncate={value['truncate']!r} is invalid: true or false")


def rope_type(scaling: dict[str, Any] | None) -> str:
    return (scaling or {}).get("rope_type", "default")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_mscale(scaling: dict[str, Any] | None) -> float:
    """The factor YaRN checkpoints with ``mscale_all_dim`` (DeepSeek) apply to the softmax scale, squared
    by the caller as transformers does; 1 otherwise."""
    if rope_type(scaling) != "yarn" or not scaling.get("mscale_all_dim"):
        return 1.0
    return _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])


def _default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def inv_freq_and_attention_factor(
    dim: int, theta: float, scaling: dict[str, Any] | None, max_seq_len: int
) -> tuple[torch.Tensor, float]:
    """transformers' ``ROPE_INIT_FUNCTIONS[rope_type](config)``: inverse frequencies [dim/2] (fp32, CPU)
    and the factor cos / sin are multiplied by."""
    kind = rope_type(scaling)
    inv_freq = _default_inv_freq(dim, theta)
    if kind in ("default", "dynamic"):  # dynamic: plain RoPE up to max_seq_len (see dynamic_inv_freq)
        return inv_freq, 1.0
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        llama = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * llama / factor + smooth * llama
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, llama), 1.0
    # yarn
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    old_len = scaling.get("original_max_position_embeddings") or max_seq_len

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def dynamic_inv_freq(dim: int, theta: float, factor: float, max_seq_len: int, seq_len: int) -> torch.Tensor:
    """Dynamic NTK for a forward over ``seq_len`` > ``max_seq_len`` positions (transformers computes it
    with a tensor ``seq_len``, in fp32; so do we)."""
    n = torch.tensor(seq_len, dtype=torch.int64)
    base = theta * ((factor * n / max_seq_len) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half layout (transformers' convention, so weights copy 1:1), with the
    scalings above."""

    def __init__(
        self, head_dim: int, max_seq_len: int, theta: float, scaling: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_seq_len = head_dim, theta, max_seq_len
        self.scaling = dict(scaling) if scaling else None
        self.attention_factor = 1.0
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recomputed after a meta-device build is materialised (``to_empty`` leaves garbage)."""
        inv_freq, self.attention_factor = inv_freq_and_attention_factor(
            self.head_dim, self.theta, self.scaling, self.max_seq_len
        )
        if not self.inv_freq.is_meta:
            self.inv_freq.copy_(inv_freq)

    def forward(self, positions_T: torch.Tensor, dtype: torch.dtype) -> Rope:
        inv_freq = self.inv_freq
        if rope_type(self.scaling) == "dynamic":
            seq_len = int(positions_T.max()) + 1 if positions_T.numel() else 0
            if seq_len > self.max_seq_len:
                inv_freq = dynamic_inv_freq(
                    self.head_dim, self.theta, self.scaling["factor"], self.max_seq_len, seq_len
                ).to(inv_freq.device)
        freqs_TD2 = torch.outer(positions_T.float(), inv_freq)
        emb_TD = torch.cat((freqs_TD2, freqs_TD2), dim=-1)
        cos, sin = emb_TD.cos(), emb_TD.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


# ---- transformers' rope_parameters <-> ours -----------------------------------------------------------
def rope_scaling_from_hf(rope_parameters: dict[str, Any] | None, model_type: str) -> dict[str, Any] | None:
    """``model.rope_scaling`` for a transformers config's (standardised) ``rope_parameters``; one-line
    ``ValueError`` for what we do not implement (longrope, partial rotary ...)."""
    params = dict(rope_parameters or {})
    kind = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    params.pop("rope_theta", None)
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"{model_type}: partial_rotary_factor != 1 is not supported (RoPE on every dimension)"
        )
    if kind == "default":
        return None
    if kind not in ROPE_SCALINGS:
        raise ValueError(
            f"{model_type}: rope_type={kind!r} is not supported (default, {', '.join(ROPE_SCALINGS)})"
        )
    required, optional = ROPE_SCALINGS[kind]
    out = {
        "rope_type": kind,
        **{k: v for k, v in params.items() if k in required + optional and v is not None},
    }
    validate_rope_scaling(out, "rope_parameters")
    return out


def rope_parameters_for_hf(theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """transformers' ``rope_parameters`` for ``model.rope_theta`` and ``model.rope_scaling``."""
    out: dict[str, Any] = {"rope_type": rope_type(scaling), "rope_theta": float(theta)}
    out.update({k: v for k, v in (scaling or {}).items() if k != "rope_type"})
    return out
