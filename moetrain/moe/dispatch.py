"""Dispatch and combine: group token copies by expert, then scatter expert outputs back.

Dropless by default (every token copy is computed). With a capacity factor (GShard/Switch), each
expert keeps at most ``ceil(capacity_factor * N * k / E)`` copies, in token order, and the rest are
dropped (their slot contributes zero; the residual connection carries the token on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    token_idx_S: torch.Tensor  # source token of each kept copy, sorted by expert (S = kept copies)
    slot_idx_S: torch.Tensor  # flat index into the [N*k] routing slots, for the combine weights
    tokens_per_expert_E: torch.Tensor  # int64 counts of kept copies per expert (global ids)
    routed_per_expert_E: torch.Tensor  # int64 counts before dropping (what the router asked for)
    num_dropped: int


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    # Round off float noise first: 1.1 * 25 * 2 / 5 == 11.000000000000002 must give 11, not 12.
    return max(1, math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9)))


def tokens_per_expert(sorted_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 copies per expert from ids sorted ascending. Unlike ``torch.bincount`` (which reads the
    maximum back to size its output, a host sync on CUDA per layer and micro-batch), the boundaries
    of each expert's run come from ``searchsorted`` and stay on the device."""
    edges = torch.arange(num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.diff(torch.searchsorted(sorted_ids, edges))


def plan_dispatch(
    expert_ids_NK: torch.Tensor, num_experts: int, capacity_factor: float | None
) -> DispatchPlan:
    N, K = expert_ids_NK.shape
    flat_ids = expert_ids_NK.reshape(-1)
    # Stable sort keeps token order inside each expert: capacity drops the latest tokens.
    order = torch.argsort(flat_ids, stable=True)
    routed = tokens_per_expert(flat_ids[order], num_experts)
    if capacity_factor is None:
        return DispatchPlan(order // K, order, routed, routed, 0)
    capacity = expert_capacity(N, K, num_experts, capacity_factor)
    starts = torch.cumsum(routed, 0) - routed
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[flat_ids[order]]
    keep = rank_in_expert < capacity
    kept = order[keep]
    kept_counts = torch.clamp(routed, max=capacity)
    return DispatchPlan(kept // K, kept, kept_counts, routed, int(order.numel() - kept.numel()))


def combine(
    y_SH: torch.Tensor, plan: DispatchPlan, weights_NK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """out[n] = sum over kept copies of n: weight * expert_output."""
    w_S = weights_NK.reshape(-1)[plan.slot_idx_S].unsqueeze(-1)
    out = torch.zeros(num_tokens, y_SH.shape[-1], dtype=y_SH.dtype, device=y_SH.device)
    return out.index_add(0, plan.token_idx_S, y_SH * w_S)
