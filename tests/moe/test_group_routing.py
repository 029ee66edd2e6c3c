"""Group-limited routing (DeepSeek-V3 / GLM-4.5): the same choice and weights as transformers'
DeepseekV3TopkRouter, independent of the batch a token shares, with the config checks.

transformers' router and ours compute the same fp32 scores up to one rounding of the sigmoid (ours
goes through fp64, see router.py), so the chosen experts are equal for every token whose choice is
not a near-tie; the test draws logits far from ties and compares ids exactly, weights to rounding."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ConfigError, MoEConfig
from moetrain.moe.router import TopKRouter
from moetrain.testing import assert_close_scaled, rounding_rel, tiny_model_config

E, H, K, N = 16, 24, 4, 64


def _pair(n_group: int, topk_group: int, scale: float, bias: bool = True, normalize: bool = True):
    """Our router and transformers' DeepseekV3TopkRouter with the same gate and selection bias."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = DeepseekV3Config(
        hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=scale, norm_topk_prob=normalize,
    )  # fmt: skip
    theirs = DeepseekV3TopkRouter(hf_cfg)
    ours = TopKRouter(H, E, K, MoEConfig(
        normalize_top_k=normalize, score_function="sigmoid", n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=scale, selection_bias=bias,
    ))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.randn(E, H, generator=g) * 0.5
        ours.gate.weight.copy_(w)
        theirs.weight.copy_(w)
        if bias:
            b = torch.randn(E, generator=g) * 0.1
            ours.expert_bias.copy_(b)
            theirs.e_score_correction_bias.copy_(b)
    return ours, theirs


def _x(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


@pytest.mark.numerics
@pytest.mark.parametrize(("n_group", "topk_group", "scale"), [(4, 2, 2.5), (8, 3, 1.0), (1, 1, 1.5)])
def test_matches_transformers_deepseek_v3_router(n_group: int, topk_group: int, scale: float) -> None:
    ours, theirs = _pair(n_group, topk_group, scale)
    x = _x()
    with torch.no_grad():
        r = ours(x)
        _, w_hf, ids_hf = theirs(x)
    # sorted=False in transformers: compare per token as (id -> weight) maps
    o_ids, o_order = r.expert_ids_NK.sort(dim=-1)
    h_ids, h_order = ids_hf.sort(dim=-1)
    assert torch.equal(o_ids, h_ids)
    assert_close_scaled(
        r.weights_NK.gather(-1, o_order), w_hf.gather(-1, h_order), "weights", rel=rounding_rel(8)
    )
    if n_group > 1:  # every token's experts lie in at most topk_group groups
        groups = o_ids // (E // n_group)
        assert all(len(set(row)) <= topk_group for row in groups.tolist())


def test_groups_change_the_choice() -> None:
    """Negative control: the same router without group limits picks other experts for some tokens."""
    ours, _ = _pair(4, 1, 1.0)
    x = _x()
    with torch.no_grad():
        limited = ours(x).expert_ids_NK.sort(-1).values
        ours.n_group = ours.topk_group = 1
        free = ours(x).expert_ids_NK.sort(-1).values
    assert not torch.equal(limited, free)


def test_choice_does_not_depend_on_the_batch() -> None:
    """A token routes the same alone, in a small batch or in a large one (expert parallelism == one process)."""
    ours, _ = _pair(4, 2, 2.5)
    # Exact gate products (small integers, multiples of 1/64, as tests/moe/test_router.py does): the
    # GEMM's blocking may depend on the row count, the routing under test must not.
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (257, H), generator=g).float()
    with torch.no_grad():
        ours.gate.weight.copy_(torch.randint(-8, 9, (E, H), generator=g).float() / 64)
        ours.expert_bias.copy_(torch.randint(-8, 9, (E,), generator=g).float() / 64)
        full = ours(x)
        for lo, hi in ((0, 1), (5, 12), (100, 257)):
            part = ours(x[lo:hi])
            assert torch.equal(part.expert_ids_NK, full.expert_ids_NK[lo:hi])
            assert torch.equal(part.weights_NK, full.weights_NK[lo:hi])


def test_scaling_multiplies_the_weights() -> None:
    a, _ = _pair(4, 2, 1.0)
    b, _ = _pair(4, 2, 2.5)
    x = _x()
    with torch.no_grad():
        ra, rb = a(x), b(x)
    assert torch.equal(ra.expert_ids_NK, rb.expert_ids_NK)
    assert_close_scaled(rb.weights_NK, 2.5 * ra.weights_NK, "scaled", rel=rounding_rel(2))
    assert torch.allclose(ra.weights_NK.sum(-1), torch.ones(N))


def test_selection_bias_is_state_without_updates() -> None:
    ours, _ = _pair(4, 2, 1.0)
    assert "expert_bias" in dict(ours.named_buffers())
    before = ours.expert_bias.clone()
    ours.update_bias(torch.arange(E, dtype=torch.float32))  # rate 0: nothing moves
    assert torch.equal(ours.expert_bias, before)


@pytest.mark.parametrize(
    ("moe", "message"),
    [
        ({"n_group": 3}, "model.moe.n_group=3 is invalid: must divide num_experts=16"),
        ({"n_group": 16}, "model.moe.n_group=16 is invalid"),  # groups of one expert have no top-2
        (
            {"n_group": 4, "topk_group": 5},
            "model.moe.topk_group=5 is invalid: must be between 1 and n_group=4",
        ),
        (
            {"n_group": 8, "topk_group": 1},
            "model.top_k=4 is invalid: must be <= topk_group x experts per group",
        ),
        ({"routed_scaling_factor": 0.0}, "model.moe.routed_scaling_factor=0.0 is invalid"),
    ],
)
def test_bad_group_settings_fail_in_one_line(moe: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        tiny_model_config(num_experts=16, top_k=4, moe=MoEConfig(**moe))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_export_refuses_what_transformers_families_cannot_hold() -> None:
    """Softmax routers with groups or scaling: no transformers family (Mixtral, Qwen, OLMoE) holds them."""
    from moetrain.hf import hf_architecture

    cfg = tiny_model_config(moe=MoEConfig(n_group=2, topk_group=1))
    with pytest.raises(ValueError, match="no group-limited routing"):
        hf_architecture(cfg)
