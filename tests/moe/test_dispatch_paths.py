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


@pytest.mark.parametrize("N,E,k,block", [(37, 5, 2, 4), (64, 16, 4, 8), (10, 3, 1, 32), (9, 4, 4, 4)])
def test_row_blocks_in_the_plan_change_nothing(N, E, k, block):
    """A plan padded to row blocks: every expert's rows a multiple of ``block``, the same combined
    output and the same gradients for x and the weights as the unpadded plan; the padding rows are
    computed (from token 0, scaled x50 so a leak would show) but never read: their gradient is 0."""
    gen = torch.Generator().manual_seed(N * 100 + E * 10 + k)
    weights, ids = torch.topk(torch.randn(N, E, generator=gen).softmax(-1), k)
    weights = weights.double().requires_grad_(True)
    x = torch.randn(N, 8, dtype=torch.float64, generator=gen)
    x[0] *= 50
    x.requires_grad_(True)
    grad_out = torch.randn(N, 8, dtype=torch.float64, generator=gen)
    results, grads_y = [], []
    plans = (plan_dispatch(ids, E, None), plan_dispatch(ids, E, None, row_block=block))
    for plan in plans:
        x.grad = weights.grad = None
        x_SH = gather_copies(x, plan)
        y_SH = torch.tanh(x_SH) * 1.5 + x_SH  # any row-wise function: padding must not change it
        y_SH.register_hook(grads_y.append)
        out = combine(y_SH, plan, weights, N)
        out.backward(grad_out)
        results.append((out.detach(), x.grad.clone(), weights.grad.clone()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    unpadded, padded = plans
    assert torch.equal(padded.routed_per_expert_E, unpadded.tokens_per_expert_E)
    assert (padded.tokens_per_expert_E % block == 0).all()
    assert torch.equal(
        (padded.tokens_per_expert_E - unpadded.tokens_per_expert_E).clamp(0, block - 1),
        padded.tokens_per_expert_E - unpadded.tokens_per_expert_E,
    )
    is_pad = padded.slot_idx_S == N * k
    assert is_pad.any()  # every case pads some expert
    assert int(is_pad.sum()) == int((padded.tokens_per_expert_E - unpadded.tokens_per_expert_E).sum())
    assert (padded.token_idx_S[is_pad] == 0).all()
    assert torch.count_nonzero(grads_y[1][is_pad]) == 0
    assert torch.equal(grads_y[1][~is_pad], grads_y[0])  # real rows: same gradient, same order


@pytest.mark.parametrize("block", [1, 4])
def test_combine_backward_branches_agree(block, monkeypatch):
    """The combine's backward has two ways to the same gradients (per-sample dot kernel + weighted
    embedding_bag; gather + row dot + scale, used for CPU half types): both against autograd through
    the scatter path, in fp64."""
    import moetrain.moe.dispatch as dispatch

    gen = torch.Generator().manual_seed(7)
    N, E, k = 29, 5, 2
    weights, ids = torch.topk(torch.randn(N, E, generator=gen).softmax(-1), k)
    weights = weights.double().requires_grad_(True)
    y_in = torch.randn(N * k + E * block, 6, dtype=torch.float64, generator=gen)
    grad_out = torch.randn(N, 6, dtype=torch.float64, generator=gen)
    plan = plan_dispatch(ids, E, None, row_block=block)
    y_SH = y_in[: plan.token_idx_S.numel()].clone().requires_grad_(True)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(dispatch, "_per_sample_dot_is_fast", lambda t, fast=fast: fast)
        y_SH.grad = weights.grad = None
        combine(y_SH, plan, weights, N).backward(grad_out)
        results.append((y_SH.grad.clone(), weights.grad.clone()))
    # the reference: out[n] = sum over n's copies of w * y, by index_add (autograd's own backward)
    y_ref = y_SH.detach().clone().requires_grad_(True)
    w_ref = weights.detach().clone().requires_grad_(True)
    w_S = torch.nn.functional.pad(w_ref.reshape(-1), (0, 1))[plan.slot_idx_S].unsqueeze(-1)
    ref = torch.zeros(N, 6, dtype=torch.float64).index_add(0, plan.token_idx_S, y_ref * w_S)
    ref.backward(grad_out)
    for got_y, got_w in results:
        torch.testing.assert_close(got_y, y_ref.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_w, w_ref.grad, rtol=1e-12, atol=1e-12)
