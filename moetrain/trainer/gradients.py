"""The exact global gradient norm and clipping (ZeRO-0; DeepSpeed clips at ZeRO-1/2/3)."""

from __future__ import annotations

import math

import torch

from moetrain.distributed import all_reduce_sum


@torch.no_grad()
def global_grad_norm(model: torch.nn.Module, ep) -> float | None:
    """Global L2 norm of the (already reduced) gradients.

    Expert shards are summed over the expert-parallel group and replicated params counted once,
    so the norm (and the clipping) equals a single process's on the same global batch. Squares are
    summed in float64 on the gradients' device; one host sync per optimizer step (the norm)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return None
    zero = torch.zeros((), dtype=torch.float64, device=params[0].grad.device)
    dense, expert = zero.clone(), zero.clone()
    for p in params:
        # float64 accumulation without a float64 copy of the gradient (5x cheaper than .double())
        sq = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64).square()
        if getattr(p, "allreduce", True) is False:
            expert += sq
        else:
            dense += sq
    if ep.enabled:
        expert = all_reduce_sum(expert, ep.group)
    return math.sqrt(float(dense + expert))


@torch.no_grad()
def clip_grads_(model: torch.nn.Module, norm: float, max_norm: float) -> None:
    """Scale every gradient by ``max_norm / norm`` when ``norm`` exceeds ``max_norm`` (> 0)."""
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], coef)
