"""The router: batch-invariant routing, the z-loss and probability-sum gradients, the entropy metric."""

from __future__ import annotations

import pytest
import torch

from .test_dropless import make_layer

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_a_tokens_routing_does_not_depend_on_its_batch(score_function):
    """Bit for bit the same scores, choices and weights for a token alone or among others: expert
    parallelism splits the batch differently from one process and must still route identically.
    (torch's fp32 sigmoid alone fails this: it rounds the tail of a call differently from its body.)"""
    torch.manual_seed(2)
    layer = make_layer(32, 8, 8, 2, score_function=score_function, expert_impl="loop")
    # Small integers and multiples of 1/64: every gate product and sum is exact in fp32, so the GEMM
    # (whose blocking may depend on the row count) rounds nothing and only the scoring is under test.
    x = torch.randint(-3, 4, (203, 32)).float()
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.randint(-8, 9, (8, 32)).float() / 64)
        whole = layer.router(x)
        for lo, hi in ((0, 77), (77, 203), (5, 6), (100, 131)):
            part = layer.router(x[lo:hi])
            assert torch.equal(part.probs_NE, whole.probs_NE[lo:hi]), (lo, hi)
            assert torch.equal(part.expert_ids_NK, whole.expert_ids_NK[lo:hi]), (lo, hi)
            assert torch.equal(part.weights_NK, whole.weights_NK[lo:hi]), (lo, hi)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_z_loss_and_prob_sum_gradients_reach_the_gate(score_function):
    """The layer's z-loss and probability sums, backpropagated to the gate, equal torch's ops written
    out on the same logits. The router computes in fp32 whatever the model dtype, so does the
    reference: the two differ by fp32 rounding (~1e-7 here), a wrong or missing term by O(1e-2)."""
    torch.manual_seed(0)
    layer = make_layer(16, 8, 5, 2, score_function=score_function, expert_impl="loop").double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    gate = layer.router.gate.weight
    coef = torch.randn(5, dtype=torch.float64)

    _, stats = layer(x)
    (stats.z_loss + (stats.prob_sum_E * coef).sum()).backward()
    got = gate.grad.clone()

    ref_gate = gate.detach().clone().requires_grad_(True)
    logits = (x.reshape(-1, 16) @ ref_gate.T).float()
    if score_function == "softmax":
        probs = torch.softmax(logits, -1)
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    ref = torch.logsumexp(logits, -1).pow(2).mean() + (probs.sum(0) * coef).sum()
    ref.backward()
    torch.testing.assert_close(got, ref_gate.grad, rtol=1e-5, atol=1e-6)
    assert got.abs().max() > 1e-3  # the check has something to compare


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_entropy_is_that_of_the_normalised_scores(score_function):
    """The softmax router's entropy comes from lse - <p, logits> (no log over [N, E]): it equals
    -sum p log p of the same probabilities, here for peaked and flat rows alike."""
    torch.manual_seed(1)
    layer = make_layer(16, 8, 6, 2, score_function=score_function, expert_impl="loop")
    x = torch.randn(3, 5, 16) * torch.linspace(0.05, 4.0, 5)[None, :, None]  # flat ... peaked
    with torch.no_grad():
        routing = layer.router(x.reshape(-1, 16))
        p = routing.probs_NE.double()
        want = -(p * p.log()).sum(-1).mean()
    assert routing.entropy.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert 0.0 < want.item() < torch.log(torch.tensor(6.0)).item()
