"""Group-limited routing and routed_scaling_factor (DeepSeek-V3): our router chooses the experts and
weighs them as transformers' DeepseekV3TopkRouter does; bad settings fail in one line."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from moetrain.config import ConfigError, MoEConfig
from moetrain.moe.router import TopKRouter
from moetrain.testing import assert_close_scaled, rounding_rel, tiny_model_config

H, E, K, GROUPS, TOPK_GROUP, SCALE = 16, 8, 2, 4, 2, 2.5


def _routers():
    torch.manual_seed(0)
    ours = TopKRouter(H, E, K, True, 0.0, "sigmoid", 1e-3, GROUPS, TOPK_GROUP, SCALE)
    cfg = transformers.DeepseekV3Config(
        hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, n_group=GROUPS, topk_group=TOPK_GROUP,
        routed_scaling_factor=SCALE, norm_topk_prob=True,
    )  # fmt: skip
    theirs = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        ours.gate.weight.normal_(0, 0.5)
        ours.expert_bias.copy_(torch.randn(E) * 0.1)
        theirs.weight.copy_(ours.gate.weight)
        theirs.e_score_correction_bias.copy_(ours.expert_bias)
    return ours, theirs


def _sorted(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(dim=-1)
    return ids.gather(-1, order), w.gather(-1, order)


@pytest.mark.numerics
def test_group_limited_choice_and_weights_equal_transformers() -> None:
    ours, theirs = _routers()
    x = torch.randn(256, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r = ours(x)
        _, w_theirs, ids_theirs = theirs(x)
    ids_a, w_a = _sorted(r.expert_ids_NK, r.weights_NK)
    ids_b, w_b = _sorted(ids_theirs, w_theirs)
    assert torch.equal(ids_a, ids_b)
    assert_close_scaled(w_a, w_b, "routing weights", rel=rounding_rel(8))
    assert torch.allclose(w_a.sum(-1), torch.full((256,), SCALE))  # renormalised, then scaled
    # each token's experts lie in at most topk_group groups
    assert all(len(set((row // (E // GROUPS)).tolist())) <= TOPK_GROUP for row in ids_a)
    # negative control: without groups some tokens choose other experts
    ours.n_group = 1
    with torch.no_grad():
        ids_free, _ = _sorted(ours(x).expert_ids_NK, ours(x).weights_NK)
    assert not torch.equal(ids_free, ids_b)


@pytest.mark.parametrize(
    ("moe", "message"),
    [
        ({"n_group": 3}, "model.moe.n_group=3 is invalid: must divide num_experts=4"),
        ({"n_group": 2, "topk_group": 3}, "model.moe.topk_group=3 is invalid"),
        ({"routed_scaling_factor": 0.0}, "model.moe.routed_scaling_factor=0.0 is invalid"),
        ({"n_group": 4}, "model.moe.n_group=4 is invalid"),  # groups of one expert have no top-2
    ],
)
def test_bad_group_settings_fail_in_one_line(moe: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        tiny_model_config(moe=MoEConfig(**moe))
    assert str(e.value).startswith(message), str(e.value)


def test_export_refuses_what_transformers_families_cannot_hold() -> None:
    from moetrain.hf import hf_architecture

    cfg = tiny_model_config(moe=MoEConfig(n_group=2, topk_group=1))
    with pytest.raises(ValueError, match="no group-limited routing"):
        hf_architecture(cfg)
