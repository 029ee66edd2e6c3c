"""LoRA adapters applied from the outside to a built ``MoETransformer`` (``model.lora.rank`` > 0).

``apply_lora(model, cfg)`` freezes every parameter of the model and adds trainable low-rank
adapters (Hu et al. 2021: ``W x + alpha/r * B A dropout(x)``, B zero-initialised so the adapted
model starts exactly as the base) to the chosen targets:

- ``attention``: the q/k/v/o projections (multi-head latent attention: q_a/q_b or q, kv_a, kv_b,
  o); ``router``: the MoE router's gate; ``shared_expert``: the shared expert's three projections
  (and its gate). These are ``nn.Linear``s; their class becomes :class:`LoRALinear` in place, so
  the base weights keep their names (``attention.q_proj.weight``) and the adapters sit next to
  them (``attention.q_proj.weight_lora_A``, ``..._lora_B``).
- ``experts``: every routed expert's w1, v1, w2, as grouped tensors next to the fused weights
  (``experts.w1_lora_A`` [E, r, in], ``experts.w1_lora_B`` [E, out, r]); the experts' class becomes
  :class:`LoRAGroupedExperts`, whose GEMMs add the adapters' two thin grouped GEMMs on the same
  expert-sorted rows (``torch.nn.functional.grouped_mm``, no per-expert Python loop). Under expert
  parallelism the model arrives with this rank's experts only, so each rank holds its experts'
  adapters; they are initialised per global expert id, so any ``ep_size`` starts from the same values.

Every adapter tensor is named ``<base parameter>_lora_A`` / ``_lora_B``: :func:`merge_lora` folds
them into the base parameters of a state dict (the merged export), :func:`lora_param_count` gives
the trainable parameter count from the config alone (plan, banner, tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import ConfigError, LoRAConfig, ModelConfig
from moetrain.moe.experts import EXPERT_WEIGHTS, GroupedExperts, grouped_mm_supported

SUFFIX_A, SUFFIX_B = "_lora_A", "_lora_B"
# The attention's linear maps: GQA's, and multi-head latent attention's (model/mla.py) beside them.
ATTENTION_PROJECTIONS = (
    *("q_proj", "k_proj", "v_proj", "o_proj"),
    *("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"),
)


def _generator(seed: int, name: str, index: int = -1) -> torch.Generator:
    from moetrain.model.transformer import _seed

    return torch.Generator().manual_seed(_seed(seed, f"lora/{name}", index))


def _init_a(shape: tuple[int, ...], seed: int, name: str, index: int = -1) -> torch.Tensor:
    """Kaiming-uniform like ``nn.Linear`` (and PEFT): U(-1/sqrt(in), 1/sqrt(in)), seeded by name."""
    bound = 1.0 / math.sqrt(shape[-1])
    return torch.empty(shape).uniform_(-bound, bound, generator=_generator(seed, name, index))


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus ``scale * B A dropout(x)``; made by :func:`apply_lora` (class swap)."""

    weight_lora_A: nn.Parameter  # [r, in]
    weight_lora_B: nn.Parameter  # [out, r]
    lora_scale: float
    lora_dropout: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + self.lora_scale * F.linear(
            F.linear(self.lora_dropout(x), self.weight_lora_A), self.weight_lora_B
        )


class LoRAGroupedExperts(GroupedExperts):
    """``GroupedExperts`` with per-expert adapters on w1, v1 (A [E, r, H], B [E, F, r]) and w2
    (A [E, r, F], B [E, H, r]), computed on the same sorted (and row-padded) tokens as the experts."""

    lora_rank: int
    lora_scale: float
    lora_dropout: nn.Module

    def resolved_impl(self, dtype: torch.dtype) -> str:
        impl = super().resolved_impl(dtype)
        # grouped_mm's 16-byte row alignment applies to the rank dimension too (r=2 in fp32: 8 bytes)
        rank_ok = grouped_mm_supported(self.lora_rank, self.lora_rank, dtype)
        return "loop" if impl == "grouped_mm" and self.impl == "auto" and not rank_ok else impl

    def _project(self, x_S: torch.Tensor, name: str, offs: torch.Tensor) -> torch.Tensor:
        A, B = getattr(self, name + SUFFIX_A), getattr(self, name + SUFFIX_B)
        low = F.grouped_mm(self.lora_dropout(x_S), A.transpose(1, 2), offs=offs)
        return super()._project(x_S, name, offs) + self.lora_scale * F.grouped_mm(
            low, B.transpose(1, 2), offs=offs
        )

    def _project_one(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        A, B = getattr(self, name + SUFFIX_A)[e], getattr(self, name + SUFFIX_B)[e]
        return super()._project_one(x, name, e) + self.lora_scale * (self.lora_dropout(x) @ A.T @ B.T)


def _dropout(cfg: LoRAConfig) -> nn.Module:
    return nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()


def _linear_targets(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    out = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (
            ("attention" in targets and ".attention." in name and leaf in ATTENTION_PROJECTIONS)
            or ("router" in targets and name.endswith(".router.gate"))
            or (
                "shared_expert" in targets
                and (".shared_expert." in name or name.endswith(".shared_expert_gate"))
            )
        ):
            out.append((name, module))
    return out


@torch.no_grad()
def apply_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """Freeze ``model`` and add the adapters of ``cfg`` (in place); returns the trainable count.

    Call on the built model holding its base weights (after ``model.init_from`` is loaded) and
    before the optimizer is built; the adapters take each base weight's device and dtype."""
    seed = getattr(model, "_init_seed", 0)
    scale = cfg.alpha / cfg.rank
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for name, lin in _linear_targets(model, cfg.targets):
        w = lin.weight
        lin.__class__ = LoRALinear
        lin.weight_lora_A = nn.Parameter(_init_a((cfg.rank, w.shape[1]), seed, name).to(w.device, w.dtype))
        lin.weight_lora_B = nn.Parameter(w.new_zeros(w.shape[0], cfg.rank))
        lin.lora_scale, lin.lora_dropout = scale, _dropout(cfg)
        found += 1
    if "experts" in cfg.targets:
        from moetrain.moe import MoELayer

        for layer_name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)):
            experts = layer.experts
            if not isinstance(experts, GroupedExperts):  # pragma: no cover (every backend's experts are)
                raise ConfigError(f"model.lora.targets: {type(experts).__name__} experts take no adapters")
            # The torch dispatch for LoRA runs: MegaBlocks' kernels know nothing of the adapters.
            layer.moe_backend = "torch"
            experts.__class__ = LoRAGroupedExperts
            first = getattr(experts, "first_expert", 0)
            for wname in EXPERT_WEIGHTS:
                w = getattr(experts, wname)  # [E, F, H]; w2 is stored [E, F, H] but maps F -> H
                out_dim, in_dim = (w.shape[1], w.shape[2]) if wname != "w2" else (w.shape[2], w.shape[1])
                full = f"{layer_name}.experts.{wname}"
                A = torch.stack(
                    [_init_a((cfg.rank, in_dim), seed, full, first + e) for e in range(w.shape[0])]
                )
                setattr(experts, wname + SUFFIX_A, nn.Parameter(A.to(w.device, w.dtype)))
                setattr(experts, wname + SUFFIX_B, nn.Parameter(w.new_zeros(w.shape[0], out_dim, cfg.rank)))
            experts.lora_rank, experts.lora_scale, experts.lora_dropout = cfg.rank, scale, _dropout(cfg)
            found += 1
    if not found:
        raise ConfigError(
            f"model.lora.targets={list(cfg.targets)} matches nothing in this model "
            "(e.g. shared_expert on a model without one); fix: choose targets it has"
        )
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def attention_projection_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of each linear map of one layer's attention (GQA's q, k, v, o or MLA's)."""
    H, N = cfg.hidden_size, cfg.num_heads
    if not cfg.mla.enabled:
        q, kv = N * cfg.head_size, cfg.num_kv_heads * cfg.head_size
        return [(H, q), (H, kv), (H, kv), (q, H)]
    m = cfg.mla
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    q = [(H, N * qk)] if m.q_lora_rank is None else [(H, m.q_lora_rank), (m.q_lora_rank, N * qk)]
    kv = [(H, m.kv_lora_rank + m.qk_rope_head_dim), (m.kv_lora_rank, N * (m.qk_nope_head_dim + m.v_head_dim))]
    return q + kv + [(N * m.v_head_dim, H)]


def lora_param_count(cfg: ModelConfig, ep_size: int = 1) -> dict[str, int]:
    """Adapter parameters of one rank (``expert``: this rank's experts' share) from the config alone:
    r * (in + out) per adapted matrix, times the experts for grouped ones."""
    lc = cfg.lora
    if lc.rank <= 0:
        return {"non_expert": 0, "expert": 0, "total": 0}
    r, H = lc.rank, cfg.hidden_size
    per_layer_attn = r * sum(i + o for i, o in attention_projection_shapes(cfg))
    moe_layers = len(cfg.moe_layer_ids)
    dense = 0
    if "attention" in lc.targets:
        dense += cfg.num_layers * per_layer_attn
    if "router" in lc.targets:
        dense += moe_layers * r * (H + cfg.num_experts)
    S = cfg.shared_expert_intermediate_size
    if "shared_expert" in lc.targets and S:
        dense += moe_layers * (3 * r * (H + S) + (r * (H + 1) if cfg.shared_expert_gate else 0))
    expert = 0
    if "experts" in lc.targets:
        expert = moe_layers * (cfg.num_experts // ep_size) * 3 * r * (H + cfg.ffn_hidden_size)
    return {"non_expert": dense, "expert": expert, "total": dense + expert}


def merge_lora(state: dict[str, torch.Tensor], lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """A state dict (our names) with every adapter folded into its base weight and removed:
    ``W + alpha/r * B A`` for a Linear's [out, in] weight; per expert ``w1/v1 += s B A`` ([F, H])
    and ``w2 += s (B A)^T`` (w2 is stored [F, H] and maps F -> H). Computed in fp32."""
    scale = lora.alpha / lora.rank
    out = {k: v for k, v in state.items() if not k.endswith((SUFFIX_A, SUFFIX_B))}
    for key in [k for k in state if k.endswith(SUFFIX_A)]:
        base = key.removesuffix(SUFFIX_A)
        A, B = state[key].float(), state[base + SUFFIX_B].float()
        delta = scale * (B @ A)  # [out, in] (batched over experts)
        if base.endswith(".experts.w2"):
            delta = delta.transpose(-1, -2)
        out[base] = (out[base].float() + delta).to(out[base].dtype)
    return out


def adapter_names(state_names) -> list[str]:  # noqa: ANN001 (any iterable of names)
    return [k for k in state_names if k.endswith((SUFFIX_A, SUFFIX_B))]
