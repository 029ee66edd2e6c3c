"""LoRA adapters (moetrain/model/lora.py) on a tiny model, in process: the trainable count equals
the formula, zero-initialised B gives exactly the base model, the grouped expert path equals the
per-expert reference, and merging gives the adapted model's logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetrain.config import ConfigError, LoRAConfig, MLAConfig, MoEConfig
from moetrain.model import MoETransformer
from moetrain.model.lora import apply_lora, lora_param_count, merge_lora
from moetrain.testing import assert_close_scaled, rounding_rel, tiny_model_config

ALL = ["attention", "experts", "router", "shared_expert"]
# The 2025 families' modules under LoRA: gpt-oss's experts (biases, clamped SwiGLU) and attention (sinks,
# o bias, sliding / full layers); DeepSeek-V3's multi-head latent attention and group-limited router.
FAMILY_SHAPES = {
    "mixtral": {},
    "gpt_oss": {
        "attention_bias": True, "attention_out_bias": True, "attention_sinks": True, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "moe": MoEConfig(router_bias=True, expert_proj_bias=True, expert_activation="clamped_swiglu", swiglu_limit=0.5),
    },
    "deepseek_v3": {
        "mla": MLAConfig(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                         rope_interleave=True),
        "moe": MoEConfig(score_function="sigmoid", selection_bias=True, n_group=2, topk_group=1),
    },
}  # fmt: skip


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


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_trainable_count_equals_the_formula_for_the_2025_families(family) -> None:
    model, cfg = _model(ALL, **FAMILY_SHAPES[family])
    trainable = apply_lora(model, cfg.lora)
    assert trainable == lora_param_count(cfg)["total"] > 0
    adapted = {
        n.removesuffix(".weight_lora_A") for n, _ in model.named_parameters() if n.endswith("weight_lora_A")
    }
    if family == "deepseek_v3":  # every linear map of the latent attention
        leaves = {n.rsplit(".", 1)[1] for n in adapted if ".attention." in n}
        assert leaves == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}


@pytest.mark.numerics
@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
def test_zero_b_is_exactly_the_base_then_grouped_equals_loop_and_merge(family) -> None:
    model, cfg = _model(**FAMILY_SHAPES[family])
    with torch.no_grad():  # the family's biases and sinks start at zero: make them act
        for name, p in model.named_parameters():
            if name.endswith(("_bias", ".bias", ".sinks")):
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(3))
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


@pytest.mark.numerics
@pytest.mark.parametrize(
    ("family", "targets"),
    [("deepseek_v3", ["attention", "experts", "router"]), ("gpt_oss", ["attention", "router"])],
)
def test_peft_adapter_of_the_2025_families_gives_the_merged_logits(family, targets, tmp_path) -> None:
    """The PEFT folder (export --adapter) on the transformers base == the merged model; what PEFT cannot
    hold (gpt-oss's experts, DeepSeek-V3's shared experts) is a one-line refusal."""
    peft = pytest.importorskip("peft")
    from moetrain.hf import from_hf_config, hf_model_from_state
    from moetrain.peft_adapter import write_peft_adapter
    from moetrain.testing import tiny_hf_model

    cfg = from_hf_config(tiny_hf_model(family).config)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}

    def adapted(targets):
        lora_cfg = dataclasses.replace(cfg, lora=LoRAConfig(rank=4, alpha=8, targets=targets))
        m = MoETransformer(cfg)
        m.load_state_dict(base)
        apply_lora(m, lora_cfg.lora)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("_lora_B"):
                    p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))
        return lora_cfg, m.state_dict()

    lora_cfg, state = adapted(targets)
    adapters = {k: v for k, v in state.items() if "_lora_" in k}
    base_dir = tmp_path / "base"  # a local base (its config.json): PEFT looks nothing up on the hub
    hf_model_from_state(cfg, base).config.save_pretrained(str(base_dir))
    write_peft_adapter(lora_cfg, base, adapters, tmp_path / "adapter", str(base_dir))
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = hf_model_from_state(cfg, merge_lora(state, lora_cfg.lora))(ids).logits
        plain = hf_model_from_state(cfg, base)
        want = plain(ids).logits
        got = peft.PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()(ids).logits
    assert_close_scaled(got, merged, f"{family} PEFT vs merged", rel=rounding_rel(64))
    assert (merged - want).abs().max() > 1e-2  # negative control: the adapters act
    refused = ["experts"] if family == "gpt_oss" else ["shared_expert"]
    lora_cfg, state = adapted(refused)
    with pytest.raises(ValueError, match="--adapter: .*merged model") as e:
        write_peft_adapter(
            lora_cfg, base, {k: v for k, v in state.items() if "_lora_" in k}, tmp_path / "x", "b"
        )
    assert "\n" not in str(e.value)
