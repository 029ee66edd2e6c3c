"""Router losses against hand computations: switch / mixtral balance loss, z-loss, entropy."""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import MoETransformer
from moetrain.moe import RouterStats, load_balancing_loss, router_z_loss
from moetrain.testing import assert_close_scaled, rounding_rel

from ._reference import routed_experts
from .test_dropless import make_layer

# Hand numbers: a handful of fp32 operations against Python's float64 arithmetic, a few ulps apart;
# 8 ulps (~1e-6 relative) allowed.
HAND_REL = rounding_rel(8)
# From a real layer's forward: sums over 15 tokens x E experts (softmax, means, logsumexp) in another
# order than the formula written here; 64 ulps (~7.6e-6). A missing factor (k, E, 1/N) is off by >= 2x.
LAYER_REL = rounding_rel(64)


def stats_from(counts: list[float], prob_sum: list[float], num_tokens: int, z: float = 0.0) -> RouterStats:
    return RouterStats(
        tokens_per_expert_E=torch.tensor(counts, dtype=torch.float32),
        prob_sum_E=torch.tensor(prob_sum, dtype=torch.float32),
        num_tokens=num_tokens,
        z_loss=torch.tensor(z),
        entropy=torch.tensor(0.0),
        num_dropped=0,
    )


def test_switch_by_hand_numbers():
    # N=4 tokens, k=2, E=3: 8 copies routed as 4/3/1; mean probs 0.5/0.3/0.2
    s = stats_from([4, 3, 1], [2.0, 1.2, 0.8], 4)
    want = 3 * (4 / 8 * 0.5 + 3 / 8 * 0.3 + 1 / 8 * 0.2)
    assert load_balancing_loss([s], 3, 2, "switch").item() == pytest.approx(want, rel=HAND_REL)
    # mixtral = k * switch for one layer
    assert load_balancing_loss([s], 3, 2, "mixtral").item() == pytest.approx(2 * want, rel=HAND_REL)


def test_switch_averages_layers_and_mixtral_pools_them():
    a = stats_from([4, 3, 1], [2.0, 1.2, 0.8], 4)
    b = stats_from([2, 2, 4], [1.0, 1.0, 2.0], 4)
    E, k, N, L = 3, 2, 4, 2
    sw = [
        E * sum(c / (N * k) * p / N for c, p in zip(s.tokens_per_expert_E.tolist(), s.prob_sum_E.tolist()))
        for s in (a, b)
    ]
    assert load_balancing_loss([a, b], E, k, "switch").item() == pytest.approx(sum(sw) / 2, rel=HAND_REL)
    # transformers' load_balancing_loss_func: concatenate all layers' tokens, then E * sum_e f_e * P_e
    C = [x + y for x, y in zip(a.tokens_per_expert_E.tolist(), b.tokens_per_expert_E.tolist())]
    P = [x + y for x, y in zip(a.prob_sum_E.tolist(), b.prob_sum_E.tolist())]
    mix = E * sum(c / (L * N) * p / (L * N) for c, p in zip(C, P))
    assert load_balancing_loss([a, b], E, k, "mixtral").item() == pytest.approx(mix, rel=HAND_REL)


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (8, 2), (5, 5)])
def test_uniform_routing_gives_one(E, k):
    N = 10 * E
    s = stats_from([N * k / E] * E, [N / E] * E, N)
    assert load_balancing_loss([s], E, k, "switch").item() == pytest.approx(1.0, rel=HAND_REL)
    assert load_balancing_loss([s], E, k, "mixtral").item() == pytest.approx(float(k), rel=HAND_REL)


def test_uniform_probs_give_one_whatever_the_counts():
    s = stats_from([7, 0, 3, 0], [2.5] * 4, 10)  # E * sum_e f_e / E = sum_e f_e = 1
    assert load_balancing_loss([s], 4, 1, "switch").item() == pytest.approx(1.0, rel=HAND_REL)


def test_unknown_kind_is_a_one_line_error():
    with pytest.raises(ValueError) as err:
        load_balancing_loss([stats_from([1, 1], [1, 1], 2)], 2, 1, "gshard")
    assert "\n" not in str(err.value) and "gshard" in str(err.value)


def test_empty_stats_give_zero():
    assert load_balancing_loss([], 4, 2).item() == 0.0
    assert router_z_loss([]).item() == 0.0


@pytest.mark.numerics
@pytest.mark.parametrize("E,k", [(4, 2), (5, 1), (3, 3)])
def test_losses_from_a_real_layer_match_hand_computation(seed, E, k):
    """Stats of a real forward: balance loss value and gradient, z-loss, entropy against formulas on x, gate."""
    H = 8
    layer = make_layer(H, 12, E, k, expert_impl="loop")
    x = torch.randn(3, 5, H)
    N = 15
    _, stats = layer(x)
    sw = load_balancing_loss([stats], E, k, "switch")
    z = router_z_loss([stats])
    sw.backward(retain_graph=True)
    grad_sw = layer.router.gate.weight.grad.clone()

    gate = layer.router.gate.weight.detach().clone().requires_grad_(True)
    logits = x.reshape(N, H) @ gate.T
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    counts = torch.zeros(E)
    for experts in routed_experts(x.reshape(N, H), gate, k):
        for e in experts:
            counts[e] += 1
    f = counts / (N * k)
    P = probs.mean(0)
    hand = E * (f * P).sum()
    hand.backward()
    assert sw.item() == pytest.approx(hand.item(), rel=LAYER_REL)
    # gate.grad[e, h] sums over tokens n of x[n, h] * dloss/dlogit[n, e], each term at most
    # |x| * E * max(f) / N: their sum is the scale of its rounding (the gradient itself can cancel to
    # ~0, e.g. with k = E every f_e is 1/E and the loss does not depend on the gate)
    terms = E * f.max().item() * x.abs().max().item()
    assert_close_scaled(grad_sw, gate.grad, "balance-loss gradient of the gate", rel=LAYER_REL, scale=terms)
    assert load_balancing_loss([stats], E, k, "mixtral").item() == pytest.approx(
        k * hand.item(), rel=LAYER_REL
    )

    lse = torch.log(torch.exp(logits.detach()).sum(-1))
    assert z.item() == pytest.approx((lse**2).mean().item(), rel=LAYER_REL)
    ent = -(probs * torch.log(probs)).sum(-1).mean()
    assert stats.entropy.item() == pytest.approx(ent.item(), rel=LAYER_REL)


@pytest.mark.parametrize("E", [2, 4, 7])
def test_entropy_of_uniform_router_is_ln_E(E):
    layer = make_layer(8, 12, E, 1, expert_impl="loop")
    with torch.no_grad():
        layer.router.gate.weight.zero_()
    _, stats = layer(torch.randn(2, 3, 8))
    assert stats.entropy.item() == pytest.approx(math.log(E), rel=HAND_REL)
    assert load_balancing_loss([stats], E, 1, "switch").item() == pytest.approx(1.0, rel=HAND_REL)
    # logits are all zero: logsumexp = ln E
    assert router_z_loss([stats]).item() == pytest.approx(math.log(E) ** 2, rel=HAND_REL)


@pytest.mark.parametrize("kind", ["switch", "mixtral"])
def test_model_loss_is_weighted_sum(seed, kind):
    cfg = ModelConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=16,
        num_experts=4, top_k=2, max_seq_len=16,
        moe=MoEConfig(aux_loss_type=kind, aux_loss_weight=0.3, z_loss_weight=0.05),
    )  # fmt: skip
    model = MoETransformer(cfg)
    ids = torch.randint(0, 50, (2, 8))
    out = model(ids, labels_BT=ids, return_logits=True)
    assert len(out.router_stats) == 2
    lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 50), ids.reshape(-1))
    assert out.lm_loss.item() == pytest.approx(lm.item(), rel=HAND_REL)
    assert out.aux_loss.item() == pytest.approx(
        load_balancing_loss(out.router_stats, 4, 2, kind).item(), rel=HAND_REL
    )
    zs = [s.z_loss.item() for s in out.router_stats]
    assert out.z_loss.item() == pytest.approx(sum(zs) / 2, rel=HAND_REL)
    assert out.loss.item() == pytest.approx(
        lm.item() + 0.3 * out.aux_loss.item() + 0.05 * out.z_loss.item(), rel=HAND_REL
    )
