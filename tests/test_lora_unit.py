"""LoRA adapters (moetrain/model/lora.py) on a tiny model, in process: the trainable count equals
the formula, zero-initialised B gives exactly the base model, the grouped expert path equals the
per-expert reference, and merging gives the adapted model's logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetrain.config import ConfigError, LoRAConfig
from moetrain.model import MoETransformer
from moetrain.model.lora import apply_lora, lora_param_count, merge_lora
from moetrain.testing import assert_close_scaled, rounding_rel, tiny_model_config

ALL = ["attention", "experts", "router", "shared_expert"]


def _model(targets=ALL, rank=4, **overrides):
    shape = {"shared_expert_intermediate_size": 40, "shared_expert_gate": True, **overrides}
    cfg = tiny_model_config(**shape)
    cfg.lora = LoRAConfig(rank=rank, alpha=2 * rank, targets=targets)
    torch.manual_seed(0)
    return MoETransformer(cfg), cfg


def _ids():
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("targets", [ALL, ["attention", "experts"], ["experts"], ["router", "shared_expert"]])
def test_trainable_count_equals_the_formula(targets) -> None:
    model, cfg = _model(targets)
    total = model.num_params()
    trainable = apply_lora(model, cfg.lora)
    assert trainable == lora_param_count(cfg)["total"] > 0
    assert model.num_params() == total + trainable  # the base is all still there, frozen
    assert all(("_lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    # hand count for the tiny shape (H 32, heads 4 x 8, kv 2 x 8, F 48, E 4, S 40, 2 MoE layers, r 4)
    r, H, F, E, S, L = 4, 32, 48, 4, 40, 2
    hand = {
        "attention": L * r * ((H + 32) + 2 * (H + 16) + (32 + H)),
        "experts": L * E * 3 * r * (H + F),
        "router": L * r * (H + E),
        "shared_expert": L * (3 * r * (H + S) + r * (H + 1)),
    }
    assert trainable == sum(hand[t] for t in targets)


@pytest.mark.numerics
def test_zero_b_is_exactly_the_base_then_grouped_equals_loop_and_merge() -> None:
    model, cfg = _model()
    ids = _ids()
    base = model(ids, ids, return_logits=True)
    apply_lora(model, cfg.lora)
    same = model(ids, ids, return_logits=True)
    assert torch.equal(same.loss, base.loss) and torch.equal(same.logits, base.logits)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_lora_B"):
                p.normal_(0.0, 0.05, generator=gen)
    grouped = model(ids, return_logits=True).logits
    assert (grouped - base.logits).abs().max() > 1e-3  # negative control: the adapters act
    for layer in model.moe_layers:
        assert layer.experts.resolved_impl(torch.float32) == "grouped_mm"
        layer.experts.impl = "loop"
    loop = model(ids, return_logits=True).logits
    assert_close_scaled(grouped, loop, "grouped vs per-expert LoRA", rel=rounding_rel(64))
    merged_cfg = dataclasses.replace(cfg, lora=LoRAConfig())
    merged = MoETransformer(merged_cfg)
    merged.load_state_dict(merge_lora(model.state_dict(), cfg.lora))
    merged_logits = merged(ids, return_logits=True).logits
    assert_close_scaled(merged_logits, loop, "merged vs adapted", rel=rounding_rel(64))


def test_adapters_train_and_the_base_gets_no_gradient() -> None:
    model, cfg = _model()
    apply_lora(model, cfg.lora)
    ids = _ids()
    model(ids, ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if "_lora_" not in n)
    # B is zero at first: A gets no gradient yet, B does
    assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith("_lora_B"))


def test_targets_the_model_lacks_are_one_line() -> None:
    model, cfg = _model(["shared_expert"], shared_expert_intermediate_size=0, shared_expert_gate=False)
    with pytest.raises(ConfigError, match="matches nothing"):
        apply_lora(model, cfg.lora)
    with pytest.raises(ConfigError, match="model.lora.targets"):
        LoRAConfig(rank=4, targets=["mlp"]).validate()
