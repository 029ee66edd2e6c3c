"""Capacity mode: a huge capacity factor is dropless; a small one drops the latest copies per expert."""

from __future__ import annotations

import pytest
import torch

from moetrain.moe.dispatch import expert_capacity, plan_dispatch

from ._reference import capacity, kept_copies, routed_experts
from .test_dropless import assert_matches_reference, layer_vs_reference, make_layer


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("E,k", [(4, 2), (5, 1), (3, 3)])
def test_huge_capacity_equals_dropless(seed, impl, E, k):
    H, F = 8, 12
    dropless = make_layer(H, F, E, k, expert_impl=impl)
    capped = make_layer(H, F, E, k, expert_impl=impl, capacity_factor=1000.0)
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 9, H)
    g = torch.randn_like(x)

    results = []
    for layer in (dropless, capped):
        xi = x.clone().requires_grad_(True)
        out, stats = layer(xi)
        (out * g).sum().backward()
        results.append((out, xi.grad, stats, {n: p.grad for n, p in layer.named_parameters()}))
    (out_a, gx_a, st_a, gp_a), (out_b, gx_b, st_b, gp_b) = results

    assert st_b.num_dropped == 0
    # nothing dropped: capacity mode keeps every copy in the same sorted order, so both layers run the
    # same operations on the same shapes -- bit for bit
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(gx_b, gx_a, rtol=0, atol=0)
    for name in gp_a:
        torch.testing.assert_close(gp_b[name], gp_a[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(st_b.tokens_per_expert_E, st_a.tokens_per_expert_E)


@pytest.mark.numerics
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize(
    "N,E,k,cf",
    [
        (20, 4, 2, 0.5),  # capacity ceil(0.5 * 20 * 2 / 4) = 5
        (20, 4, 2, 0.3),  # ceil(3) = 3
        (25, 5, 2, 1.1),  # ceil(11) = 11, though 1.1 * 25 * 2 / 5 = 11.000000000000002 in floats
        (21, 3, 1, 0.7),  # ceil(4.9) = 5
        (20, 5, 2, 0.25),  # ceil(2) = 2
    ],
)
def test_small_capacity_drops_latest_copies(seed, impl, N, E, k, cf):
    H, F = 8, 12
    layer = make_layer(H, F, E, k, expert_impl=impl, capacity_factor=cf)
    with torch.no_grad():  # skew the router so some experts overflow
        layer.router.gate.weight[0] += 1.5
    x = torch.randn(1, N, H)

    choices = routed_experts(x.reshape(-1, H), layer.router.gate.weight, k)
    cap = capacity(N, k, E, cf)
    routed = [sum(e == j for c in choices for e in c) for j in range(E)]
    expected_dropped = sum(max(0, r - cap) for r in routed)
    assert expected_dropped > 0, "test setup should overflow at least one expert"
    keep = kept_copies(choices, E, cap)
    assert len(keep) == N * k - expected_dropped

    out, ref, grads, stats = layer_vs_reference(layer, x, keep=keep)

    assert stats.num_dropped == expected_dropped
    # The stats count what the router asked for (before dropping): the balance loss sees real demand.
    assert stats.tokens_per_expert_E.tolist() == [float(r) for r in routed]
    assert_matches_reference(out, ref, grads)  # rounding only (REF_REL in test_dropless.py)


def test_fully_dropped_token_outputs_zero(seed):
    """A token whose every copy is dropped gets exactly zero from the layer (the residual carries it)."""
    H, E = 8, 2
    layer = make_layer(H, 12, E, 1, expert_impl="loop", capacity_factor=0.25)  # capacity ceil(0.25*8/2) = 1
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(1, 8, H)
    x[0, :, 0] = 1.0
    out, stats = layer(x)
    assert stats.num_dropped == 7
    assert out[0, 0].abs().sum() > 0  # the earliest token is kept
    assert torch.equal(out[0, 1:], torch.zeros_like(out[0, 1:]))  # nothing added to them: exactly 0


@pytest.mark.parametrize(
    "N,k,E,cf",
    [
        (20, 2, 4, 0.3),
        (24, 2, 8, 1.1),
        (10, 1, 4, 0.1),
        (100, 2, 8, 1.25),
        (7, 3, 5, 2.0),
        # float products land just above an integer: 11.000000000000002, 55.00000000000001
        (25, 2, 5, 1.1),
        (200, 2, 8, 1.1),
        (100, 2, 4, 1.1),
    ],
)
def test_expert_capacity_is_exact_ceiling(N, k, E, cf):
    assert expert_capacity(N, k, E, cf) == capacity(N, k, E, cf)


def test_plan_dispatch_against_hand_example():
    # 6 tokens, top-2 over 3 experts; capacity 2 per expert.
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 2], [0, 2], [2, 1]])
    plan = plan_dispatch(ids, 3, capacity_factor=0.5)  # ceil(0.5 * 6 * 2 / 3) = 2
    # expert 0 gets tokens 0,1,2,4 -> keeps 0,1; expert 1: 0,2,3,5 -> 0,2; expert 2: 1,3,4,5 -> 1,3
    assert plan.token_idx_S.tolist() == [0, 1, 0, 2, 1, 3]
    assert plan.slot_idx_S.tolist() == [0, 2, 1, 5, 3, 7]
    assert plan.tokens_per_expert_E.tolist() == [2, 2, 2]
    assert plan.routed_per_expert_E.tolist() == [4, 4, 4]
    assert plan.num_dropped == 6
