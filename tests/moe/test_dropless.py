"""The dropless MoE layer equals a naive per-token reference, forward and backward."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from moetrain.config import MoEConfig
from moetrain.moe import MoELayer
from moetrain.moe import experts as experts_module
from moetrain.testing import assert_close_scaled, rounding_rel

from ._reference import reference_moe, routed_experts

# The layer (sorted, batched per expert, index_add combine) against the per-token reference (one
# matrix-vector product per token and expert, a hand-written softmax): the same math summed in
# another order, so each result may differ by 64 ulps (~7.6e-6) of the size of the terms it sums.
# That size is the layer's largest value among output and gradients (all O(1) here, weights
# N(0, 0.3)), not each tensor's own: the gate's gradient can cancel to ~0 (top-k = E with
# renormalised weights does not depend on the gate at all) while its terms stay O(1). A wrong routing
# weight, expert or normalisation is off by O(1e-1) of that scale.
REF_REL = rounding_rel(64)


def assert_matches_reference(out, ref, grads) -> None:
    for name, got, _ in grads:
        assert got is not None, name
    scale = max(t.abs().max().item() for t in (ref, *(want for _, _, want in grads)))
    assert_close_scaled(out, ref, "output", rel=REF_REL, scale=scale)
    for name, got, want in grads:
        assert_close_scaled(got, want, f"grad of {name}", rel=REF_REL, scale=scale)


def make_layer(H: int, F: int, E: int, k: int, **moe_kwargs) -> MoELayer:
    layer = MoELayer(H, F, E, k, MoEConfig(**moe_kwargs))
    with torch.no_grad():
        layer.router.gate.weight.normal_(0.0, 0.7)  # decisive routing: no near-ties in the top-k
        for p in (layer.experts.w1, layer.experts.v1, layer.experts.w2):
            p.normal_(0.0, 0.3)
    return layer


def layer_vs_reference(layer: MoELayer, x_BTH: torch.Tensor, keep=None):
    """Run the layer and the reference on the same weights with the same upstream gradient.

    Returns (layer output, ref output, [(name, layer grad, ref grad)], stats).
    """
    H = x_BTH.shape[-1]
    g = torch.randn_like(x_BTH)
    x1 = x_BTH.clone().requires_grad_(True)
    out, stats = layer(x1)
    (out * g).sum().backward()

    params = {
        "gate": layer.router.gate.weight,
        "w1": layer.experts.w1,
        "v1": layer.experts.v1,
        "w2": layer.experts.w2,
    }
    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    x2 = x_BTH.clone().requires_grad_(True)
    ref = reference_moe(
        x2.reshape(-1, H),
        ref_params["gate"],
        ref_params["w1"],
        ref_params["v1"],
        ref_params["w2"],
        layer.top_k,
        layer.router.normalize_top_k,
        keep,
    ).view_as(x_BTH)
    (ref * g).sum().backward()
    grads = [(n, params[n].grad, ref_params[n].grad) for n in params]
    grads.append(("input", x1.grad, x2.grad))
    return out, ref, grads, stats


@pytest.mark.numerics
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("E", [3, 5, 8])
@pytest.mark.parametrize("k", [1, 2, "E"])
def test_dropless_matches_per_token_reference(seed, impl, normalize, E, k):
    top_k = E if k == "E" else k
    H, F = 8, 12  # multiples of 4: 16-byte rows in fp32, as grouped_mm needs
    layer = make_layer(H, F, E, top_k, expert_impl=impl, normalize_top_k=normalize)
    assert layer.experts.resolved_impl(torch.float32) == impl
    x = torch.randn(2, 7, H)

    out, ref, grads, stats = layer_vs_reference(layer, x)

    assert out.shape == x.shape
    assert_matches_reference(out, ref, grads)

    # The stats report what the router asked for, and nothing is dropped.
    counts = Counter(
        e for experts in routed_experts(x.reshape(-1, H), layer.router.gate.weight, top_k) for e in experts
    )
    assert stats.tokens_per_expert_E.tolist() == [float(counts[e]) for e in range(E)]
    assert stats.tokens_per_expert_E.sum().item() == x.shape[0] * x.shape[1] * top_k
    assert stats.num_dropped == 0
    assert stats.num_tokens == x.shape[0] * x.shape[1]


@pytest.mark.numerics
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_row_blocks_padded_in_the_plan_match_reference(seed, impl, monkeypatch):
    """With row blocks (the CPU bf16 default; forced to 4 here, in fp32, to compare with the
    reference), the local layer pads in the dispatch plan: the experts get row counts in blocks and
    pad nothing themselves, and the result and the stats are those of the unpadded layer."""
    E, top_k, H, F = 5, 2, 8, 12
    layer = make_layer(H, F, E, top_k, expert_impl=impl)
    layer.experts.row_block = 4
    seen = []
    compute = layer.experts._compute
    layer.experts._compute = lambda x_SH, c: (seen.append((x_SH.shape[0], c.tolist())), compute(x_SH, c))[1]
    pad_calls = []
    monkeypatch.setattr(experts_module._PadRows, "apply", lambda *a: pad_calls.append(a))
    x = torch.randn(2, 9, H)

    out, ref, grads, stats = layer_vs_reference(layer, x)

    assert_matches_reference(out, ref, grads)
    counts = Counter(
        e for experts in routed_experts(x.reshape(-1, H), layer.router.gate.weight, top_k) for e in experts
    )
    assert stats.tokens_per_expert_E.tolist() == [float(counts[e]) for e in range(E)]
    padded = [-(-counts[e] // 4) * 4 for e in range(E)]
    assert padded != [counts[e] for e in range(E)]  # some expert was padded
    assert seen == [(sum(padded), padded)]
    assert pad_calls == []  # no second pass of its own in the experts


def test_gate_grad_is_nonzero_when_weights_depend_on_router(seed):
    """Guards the reference comparison against a trivially-zero router gradient."""
    layer = make_layer(8, 12, 4, 2, expert_impl="loop")
    out, _ = layer(torch.randn(1, 5, 8))
    out.square().sum().backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


@pytest.mark.numerics
def test_loop_handles_unaligned_dims_and_auto_picks_it(seed):
    H, F = 6, 10  # 24- and 40-byte rows: not 16-byte aligned, so grouped_mm is out
    layer = make_layer(H, F, 3, 2, expert_impl="auto")
    assert layer.experts.resolved_impl(torch.float32) == "loop"
    out, ref, grads, _ = layer_vs_reference(layer, torch.randn(2, 5, H))
    assert_matches_reference(out, ref, grads)


def test_auto_picks_grouped_mm_for_aligned_dims():
    layer = make_layer(8, 12, 3, 2, expert_impl="auto")
    want = "grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "loop"
    assert layer.experts.resolved_impl(torch.float32) == want
    # bf16 rows need 8 elements for 16 bytes: 12 * 2 = 24 bytes is not aligned
    assert layer.experts.resolved_impl(torch.bfloat16) == "loop"
