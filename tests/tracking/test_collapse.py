"""The routing-collapse detector fires on a starved expert and stays quiet on balanced routing."""

import torch

from moetrain.config import MoEConfig
from moetrain.moe import MoELayer
from moetrain.tracking import CollapseDetector, RoutingAccumulator, routing_metrics


def _fractions_from_layer(layer: MoELayer, x: torch.Tensor) -> list[float]:
    _, stats = layer(x)
    acc = RoutingAccumulator([0], layer.num_experts)
    acc.add([stats])
    counts, entropy, dropped, forwards = acc.unpack(acc.packed())
    return routing_metrics([0], counts, entropy, dropped, forwards)["moe/layer_0/expert_fraction"]


def _layer(E: int = 4) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, E, 1, MoEConfig())
    for p in layer.experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return layer


def test_fires_on_forced_collapse_and_names_layer_and_expert():
    layer = _layer()
    with torch.no_grad():  # a router that sends every token to expert 0
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 1.0
    x = torch.rand(2, 32, 16) + 0.1  # positive inputs: expert 0's logit is always the largest
    det = CollapseDetector(threshold=0.1, window=3)
    messages = []
    for _ in range(3):
        messages += det.update({0: _fractions_from_layer(layer, x)})
    assert len(messages) == 3  # experts 1, 2, 3 starved
    assert "layer 0 expert 1" in messages[0]
    assert det.update({0: _fractions_from_layer(layer, x)}) == []  # reported once, not every step


def test_needs_a_sustained_window():
    det = CollapseDetector(threshold=0.1, window=3)
    starved = {0: [0.97, 0.01, 0.01, 0.01]}
    balanced = {0: [0.25, 0.25, 0.25, 0.25]}
    assert det.update(starved) == [] and det.update(starved) == []
    assert det.update(balanced) == []  # streak broken
    assert det.update(starved) == [] and det.update(starved) == []
    assert len(det.update(starved)) == 3


def test_quiet_on_balanced_router():
    layer = _layer()
    with torch.no_grad():
        layer.router.gate.weight.zero_()  # uniform probabilities; top-k ties spread by the data
        layer.router.gate.weight.normal_(std=1.0)
    x = torch.randn(4, 64, 16)
    det = CollapseDetector(threshold=0.1, window=2)
    fr = _fractions_from_layer(layer, x)
    assert min(fr) > 0.1 / 4
    assert det.update({0: fr}) == [] and det.update({0: fr}) == []
