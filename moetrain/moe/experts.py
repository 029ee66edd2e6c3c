"""SwiGLU experts stored fused: one parameter per projection for all (local) experts.

Canonical layout (shared with MegaBlocks' dMoE and mapped onto transformers' Mixtral by views):
    w1, v1, w2: [E, F, H]      out_e(x) = (silu(x w1[e]^T) * (x v1[e]^T)) w2[e]
MegaBlocks holds the same bytes as 2-D [E*F, H]; transformers' experts.e.w1 = w1[e],
experts.e.w3 = v1[e], experts.e.w2 = w2[e]^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """grouped_mm's backward rejects broadcast (stride-0) incoming gradients; make them dense."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def grouped_mm_supported(hidden_size: int, ffn_hidden_size: int, dtype: torch.dtype) -> bool:
    """grouped_mm needs 16-byte aligned rows on CPU."""
    item = torch.empty((), dtype=dtype).element_size()
    return _HAS_GROUPED_MM and (hidden_size * item) % 16 == 0 and (ffn_hidden_size * item) % 16 == 0


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, impl: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.v1 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))

    def resolved_impl(self, dtype: torch.dtype) -> str:
        if self.impl != "auto":
            return self.impl
        return "grouped_mm" if grouped_mm_supported(self.hidden_size, self.ffn_hidden_size, dtype) else "loop"

    def forward(self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """x_SH: token copies sorted by (local) expert; tokens_per_expert_E: their int counts."""
        # grouped_mm rejects an empty batch (an expert-parallel rank can receive no tokens at all).
        if self.resolved_impl(x_SH.dtype) == "grouped_mm" and x_SH.shape[0] > 0:
            return self._grouped_mm(x_SH, tokens_per_expert_E)
        return self._loop(x_SH, tokens_per_expert_E)

    def _grouped_mm(self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
        gate = F.grouped_mm(x_SH, self.w1.transpose(1, 2), offs=offs)
        up = F.grouped_mm(x_SH, self.v1.transpose(1, 2), offs=offs)
        h_SF = F.silu(gate) * up
        return _ContiguousGrad.apply(F.grouped_mm(h_SF, self.w2, offs=offs))

    def _loop(self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        counts = tokens_per_expert_E.tolist()
        outs = []
        for e, x_e in enumerate(torch.split(x_SH, counts)):
            h = F.silu(x_e @ self.w1[e].T) * (x_e @ self.v1[e].T)
            outs.append(h @ self.w2[e])
        return torch.cat(outs) if outs else x_SH.new_zeros(0, self.hidden_size)
