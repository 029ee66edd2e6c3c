"""Naive per-token MoE reference, written from the definitions alone (no moetrain code).

For each token: softmax over the gate logits, top-k (python sort), optional renormalisation, then
sum of weight * SwiGLU expert computed with plain matmuls from w1[e], v1[e], w2[e] ([E, F, H] each):
expert_e(x) = (silu(x w1[e]^T) * (x v1[e]^T)) w2[e].
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def swiglu_expert(
    x_H: torch.Tensor, w1_FH: torch.Tensor, v1_FH: torch.Tensor, w2_FH: torch.Tensor
) -> torch.Tensor:
    gate = x_H @ w1_FH.T
    up = x_H @ v1_FH.T
    h = gate * torch.sigmoid(gate) * up  # silu written out
    return h @ w2_FH


def route_token(logits_E: torch.Tensor, top_k: int, normalize: bool) -> list[tuple[int, torch.Tensor]]:
    """[(expert, weight)] for one token, highest probability first."""
    z = logits_E - logits_E.max()
    probs = torch.exp(z) / torch.exp(z).sum()
    vals = probs.detach().tolist()
    chosen = sorted(range(len(vals)), key=lambda e: -vals[e])[:top_k]
    weights = [probs[e] for e in chosen]
    if normalize:
        total = sum(weights)
        weights = [w / total for w in weights]
    return list(zip(chosen, weights))


def routed_experts(x_NH: torch.Tensor, gate_EH: torch.Tensor, top_k: int) -> list[list[int]]:
    """Chosen experts per token (in choice order), no gradients."""
    with torch.no_grad():
        return [[e for e, _ in route_token(x @ gate_EH.T, top_k, False)] for x in x_NH.float()]


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(cf * N * k / E), in exact rational arithmetic (cf as written in decimal)."""
    return max(1, math.ceil(Fraction(str(capacity_factor)) * num_tokens * top_k / num_experts))


def kept_copies(choices: list[list[int]], num_experts: int, cap: int | None) -> set[tuple[int, int]]:
    """(token, expert) copies kept: per expert, the earliest ``cap`` tokens in token order."""
    seen = [0] * num_experts
    kept = set()
    for n, experts in enumerate(choices):
        for e in experts:
            if cap is None or seen[e] < cap:
                kept.add((n, e))
            seen[e] += 1
    return kept


def reference_moe(
    x_NH: torch.Tensor,
    gate_EH: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    normalize: bool,
    keep: set[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """out[n] = sum over chosen (and kept) experts e of weight_e * expert_e(x[n])."""
    rows = []
    for n in range(x_NH.shape[0]):
        x = x_NH[n]
        acc = torch.zeros_like(x)
        for e, w in route_token(x @ gate_EH.T, top_k, normalize):
            if keep is None or (n, e) in keep:
                acc = acc + w * swiglu_expert(x, w1[e], v1[e], w2[e])
        rows.append(acc)
    return torch.stack(rows)
