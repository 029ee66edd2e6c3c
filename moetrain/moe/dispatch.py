"""Dispatch and combine: group token copies by expert, then scatter expert outputs back.

Dropless by default (every token copy is computed). With a capacity factor (GShard/Switch), each
expert keeps at most ``ceil(capacity_factor * N * k / E)`` copies, in token order, and the rest are
dropped (their slot contributes zero; the residual connection carries the token on).

Dropless, every routing slot (token n, choice j) sits at exactly one sorted position, so both
directions are gathers through the permutation and its inverse, forward and backward: no
zero-filled buffers, no scatter-add (``index_put``/``index_add`` with accumulation). The k copies of
a token are summed (and weighted) by ``embedding_bag``, one pass with no [N, k, H] temporary: on CPU
large temporaries cost page faults as well as memory passes (10-20x slower than embedding_bag at
H512 k8). Capacity mode with drops (some slots have no position) keeps the scatter path.

Row blocks (``row_block`` > 1, dropless only): each expert's copies are followed by padding rows up to
a multiple of ``row_block`` (why: ``moe/experts.py``). A padding row copies token 0 and has the zero
combine weight (slot ``N * k``), and no routing slot points at it: it is computed and never read, and
its gradient is exactly zero. Padding here, in the plan, costs no pass of its own: the gather writes
the padded layout directly and the combine reads only real rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DispatchPlan:
    # source token of each kept copy, sorted by expert (S = kept copies, plus padding rows with row blocks)
    token_idx_S: torch.Tensor
    # flat index into the [N*k] routing slots, for the combine weights (N*k: a padding row's zero)
    slot_idx_S: torch.Tensor
    tokens_per_expert_E: torch.Tensor  # int64 rows per expert (global ids): kept copies + padding
    routed_per_expert_E: torch.Tensor  # int64 counts before dropping (what the router asked for)
    num_dropped: int
    # Dropless only: sorted position of each routing slot (the inverse of slot_idx_S); None with drops.
    position_NK: torch.Tensor | None = None


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    # Round off float noise first: 1.1 * 25 * 2 / 5 == 11.000000000000002 must give 11, not 12.
    return max(1, math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9)))


def tokens_per_expert(sorted_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 copies per expert from ids sorted ascending. Unlike ``torch.bincount`` (which reads the
    maximum back to size its output, a host sync on CUDA per layer and micro-batch), the boundaries
    of each expert's run come from ``searchsorted`` and stay on the device."""
    edges = torch.arange(num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.diff(torch.searchsorted(sorted_ids, edges))


def padded_rows(
    tokens_per_expert_E: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts rounded up to a multiple of ``block``; ``dest_S``: the padded row of each real row;
    ``src_P``: the real row each padded row copies (row 0 for padding)."""
    counts = tokens_per_expert_E.to(torch.int64)
    padded = (counts + block - 1) // block * block
    S = int(counts.sum())
    shift_E = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)
    dest_S = torch.arange(S, device=counts.device) + torch.repeat_interleave(shift_E, counts, output_size=S)
    src_P = torch.zeros(int(padded.sum()), dtype=torch.int64, device=counts.device)
    src_P.index_copy_(0, dest_S, torch.arange(S, device=counts.device))
    return padded, dest_S, src_P


def plan_dispatch(
    expert_ids_NK: torch.Tensor, num_experts: int, capacity_factor: float | None, row_block: int = 1
) -> DispatchPlan:
    N, K = expert_ids_NK.shape
    flat_ids = expert_ids_NK.reshape(-1)
    # Stable sort keeps token order inside each expert: capacity drops the latest tokens.
    order = torch.argsort(flat_ids, stable=True)
    routed = tokens_per_expert(flat_ids[order], num_experts)
    if capacity_factor is None:
        if row_block > 1:
            return _padded_plan(order, routed, N, K, row_block)
        return DispatchPlan(order // K, order, routed, routed, 0, _positions(order, N, K))
    capacity = expert_capacity(N, K, num_experts, capacity_factor)
    starts = torch.cumsum(routed, 0) - routed
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[flat_ids[order]]
    keep = rank_in_expert < capacity
    kept = order[keep]
    kept_counts = torch.clamp(routed, max=capacity)
    num_dropped = int(order.numel() - kept.numel())  # boolean indexing above already synced
    # Nothing dropped: the same gather path as dropless (same operations, bit for bit).
    position = _positions(order, N, K) if num_dropped == 0 else None
    return DispatchPlan(kept // K, kept, kept_counts, routed, num_dropped, position)


def _padded_plan(order: torch.Tensor, routed: torch.Tensor, N: int, K: int, block: int) -> DispatchPlan:
    padded, dest_S, src_P = padded_rows(routed, block)
    token_P = torch.zeros_like(src_P).index_copy_(0, dest_S, order // K)  # padding copies token 0 ...
    slot_P = torch.full_like(src_P, N * K).index_copy_(0, dest_S, order)  # ... with the zero weight
    position_NK = dest_S.index_select(0, _positions(order, N, K).view(-1)).view(N, K)
    return DispatchPlan(token_P, slot_P, padded, routed, 0, position_NK)


def _positions(order: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """[N, K] sorted position of each routing slot: the inverse permutation of ``order``."""
    arange = torch.arange(order.numel(), device=order.device)
    return torch.empty_like(order).scatter_(0, order, arange).view(N, K)


class GatherRows(torch.autograd.Function):
    """x -> the rows ``index`` of x. Each subclass gives the backward, a gather again (never a
    scatter-add) through ``inverse``: an index the dispatch plan already holds, saved here for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)


class _GatherCopies(GatherRows):
    """x_NH -> x_SH, row s = x[token_idx_S[s]] (inverse: position_NK). Backward: each token's k copy
    gradients, found by their sorted positions, summed by ``embedding_bag`` in one pass (no [N, k, H]
    temporary)."""

    @staticmethod
    def backward(ctx, grad_SH: torch.Tensor):  # type: ignore[override]
        (position_NK,) = ctx.saved_tensors
        return F.embedding_bag(position_NK, grad_SH, mode="sum"), None, None


def _per_sample_dot_is_fast(t: torch.Tensor) -> bool:
    """ATen's per-sample-weight backward of ``embedding_bag`` reads each dot product straight from dout
    and y. On CPU in half precision it lost: inside a mixtral_small bf16 training step the combine
    backward took 24.9 ms per step with it against 17.5 with gather, dot and scale
    (benchmarks/results/combine_router_entropy_epyc-avx512bf16_2026-12-02.md), so CPU half types
    gather instead."""
    return t.is_cuda or t.dtype in (torch.float32, torch.float64)


class _WeightedUngather(torch.autograd.Function):
    """out[n] = sum_j w[n, j] * y[position[n, j]], one ``embedding_bag`` pass (a weighted gather-sum).
    Backward: dy[s] = w_s * dout[token_s] and dw[n, j] = <dout[n], y[position[n, j]]>. fp32 / CUDA: one
    pass each, dy as a weighted ``embedding_bag`` (bags of one copy), dw as ``embedding_bag``'s own
    per-sample-weight backward (no [S, H] gathered or product temporary; 0.5-0.7x the time of gather,
    dot and scale). CPU bf16 / fp16: dout gathered per copy once, row dot, then scaled in place."""

    @staticmethod
    def forward(ctx, y_SH, weights_NK, position_NK, token_idx_S, slot_idx_S):  # type: ignore[override]
        ctx.save_for_backward(y_SH, weights_NK, position_NK, token_idx_S, slot_idx_S)
        return F.embedding_bag(position_NK, y_SH, mode="sum", per_sample_weights=weights_NK)

    @staticmethod
    def backward(ctx, grad_NH: torch.Tensor):  # type: ignore[override]
        y_SH, weights_NK, position_NK, token_idx_S, slot_idx_S = ctx.saved_tensors
        grad_NH = grad_NH.contiguous()
        fused = _per_sample_dot_is_fast(y_SH)
        grad_SH = None if fused else grad_NH.index_select(0, token_idx_S)  # dout of each copy's token
        grad_w = None
        if ctx.needs_input_grad[1]:
            if fused:
                N, K = position_NK.shape
                bags = torch.arange(N, device=grad_NH.device)
                dot_NK = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    grad_NH, y_SH, position_NK.reshape(-1), bags * K, bags.repeat_interleave(K), 0
                )  # mode 0: sum; already in slot order
            else:
                dot_NK = (grad_SH * y_SH).sum(-1).index_select(0, position_NK.reshape(-1))
            grad_w = dot_NK.view_as(weights_NK)
        grad_y = None
        if ctx.needs_input_grad[0]:
            weights = F.pad(weights_NK.reshape(-1), (0, 1))  # slot N*k: padding rows' zero weight
            w_S = weights.index_select(0, slot_idx_S).unsqueeze(-1)
            if fused:
                grad_y = F.embedding_bag(
                    token_idx_S.unsqueeze(1), grad_NH, mode="sum", per_sample_weights=w_S
                )
            else:
                grad_y = grad_SH.mul_(w_S)
        return grad_y, grad_w, None, None, None


def gather_copies(x_NH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The token copies in expert-sorted order, [S, H]."""
    if plan.position_NK is None:
        return x_NH[plan.token_idx_S]
    return _GatherCopies.apply(x_NH, plan.token_idx_S, plan.position_NK)


def combine(
    y_SH: torch.Tensor, plan: DispatchPlan, weights_NK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """out[n] = sum over kept copies of n: weight * expert_output."""
    if plan.position_NK is not None:
        return _WeightedUngather.apply(y_SH, weights_NK, plan.position_NK, plan.token_idx_S, plan.slot_idx_S)
    w_S = weights_NK.reshape(-1)[plan.slot_idx_S].unsqueeze(-1)
    out = torch.zeros(num_tokens, y_SH.shape[-1], dtype=y_SH.dtype, device=y_SH.device)
    return out.index_add(0, plan.token_idx_S, y_SH * w_S)
