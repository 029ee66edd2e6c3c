"""The router's fused softmax + logsumexp and its entropy: values and gradients equal torch's ops."""

from __future__ import annotations

import pytest
import torch

from moetrain.moe.router import softmax_with_logsumexp

from .test_dropless import make_layer

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: exp would overflow without the max shift
def test_softmax_with_logsumexp_gradients(scale):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(11, 6, dtype=torch.float64, generator=gen) * scale).requires_grad_(True)
    probs, lse = softmax_with_logsumexp(logits)
    torch.testing.assert_close(probs, torch.softmax(logits, -1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-12, atol=1e-12)
    # Either output alone (the other's gradient arrives as None) and both together.
    assert torch.autograd.gradcheck(lambda t: softmax_with_logsumexp(t)[0], (logits,))
    assert torch.autograd.gradcheck(lambda t: softmax_with_logsumexp(t)[1], (logits,))
    assert torch.autograd.gradcheck(softmax_with_logsumexp, (logits,))


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
