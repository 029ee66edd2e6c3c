"""The gather-only dispatch/combine (dropless) equals the scatter-add path (capacity mode's), forward
and backward, including the combine weights' gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetrain.moe.dispatch import combine, gather_copies, plan_dispatch


@pytest.mark.parametrize("N,E,k", [(37, 5, 2), (64, 16, 4), (10, 3, 1), (9, 4, 4)])
def test_gather_path_equals_scatter_path(N, E, k):
    gen = torch.Generator().manual_seed(N * 100 + E * 10 + k)
    weights, ids = torch.topk(torch.randn(N, E, generator=gen).softmax(-1), k)
    weights = weights.double().requires_grad_(True)
    x = torch.randn(N, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    grad_out = torch.randn(N, 8, dtype=torch.float64, generator=gen)
    plan = plan_dispatch(ids, E, None)
    assert plan.position_NK is not None
    results = []
    for p in (plan, dataclasses.replace(plan, position_NK=None)):  # gather path, scatter path
        x.grad = weights.grad = None
        x_SH = gather_copies(x, p)
        y_SH = x_SH * torch.linspace(0.5, 2.0, x_SH.shape[0], dtype=torch.float64)[:, None]  # per-copy
        combine(y_SH, p, weights, N).backward(grad_out)
        results.append((combine(y_SH, p, weights, N).detach(), x.grad.clone(), weights.grad.clone()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_capacity_with_drops_keeps_scatter_path():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 1]])
    plan = plan_dispatch(ids, 3, capacity_factor=0.5)
    assert plan.num_dropped > 0 and plan.position_NK is None
