"""Our model and transformers' Mixtral/Mistral compute the same function from the same weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from safetensors.torch import load_file

from moetrain.config import ModelConfig, MoEConfig
from moetrain.hf import (
    from_hf_config,
    from_mixtral_state_dict,
    hf_architecture,
    to_hf_config,
    to_hf_model,
    to_mixtral_config,
    to_mixtral_state_dict,
)
from moetrain.model import MoETransformer
from moetrain.testing import assert_close_scaled, rounding_rel, tiny_model_config

VOCAB, B, T = 97, 2, 16

# Our model and transformers' compute the same function with other kernels and orders (eager or SDPA
# attention, HF's expert loop / grouped_mm vs ours, where the softmax and norms are taken): logits agree
# to rounding, 64 ulps of their scale (~7.6e-6 relative) per comparison. A wrong mapping (a swapped
# w1/w3, a transposed w2, a missing norm, a different RoPE) is off by ~1e-1 of the scale.
LOGITS_REL = rounding_rel(64)
# scalar losses from those logits / router probabilities: a cross entropy or balance loss over
# B*T tokens, a few ulps each; 16 ulps of the value
LOSS_REL = rounding_rel(16)


def _cfg(**kw) -> ModelConfig:
    return tiny_model_config(**{"vocab_size": VOCAB, **kw})


CONFIGS = {
    "base": _cfg(),
    "top1_mqa_3experts_tied": _cfg(top_k=1, num_kv_heads=1, num_experts=3, tie_embeddings=True),
    "5experts_top3_window_headdim": _cfg(num_experts=5, top_k=3, sliding_window=5, head_dim=16, num_layers=3),
    "loop_experts_theta_eps": _cfg(
        num_experts=8, rope_theta=1e6, norm_eps=1e-6, sliding_window=32, moe=MoEConfig(expert_impl="loop")
    ),
    "odd_ffn_mha_tied": _cfg(num_kv_heads=4, ffn_hidden_size=36, num_experts=5, tie_embeddings=True),
    "dense_mistral": _cfg(num_experts=0, sliding_window=6, dense_ffn_hidden_size=40),
}


def _ours(cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.numerics
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name: str, attn: str) -> None:
    cfg = CONFIGS[name]
    ours = _ours(cfg)
    hf_cfg = to_hf_config(cfg)
    cls = getattr(transformers, hf_architecture(cfg))
    assert type(hf_cfg).__name__ == cls.__name__.replace("ForCausalLM", "Config")
    hf = cls._from_config(hf_cfg, attn_implementation=attn).eval()
    hf.load_state_dict(to_mixtral_state_dict(ours.state_dict()), strict=True)
    assert hf.config._attn_implementation == attn
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = _ids()
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert_close_scaled(a, b, f"{name} {attn} logits", rel=LOGITS_REL)


@pytest.mark.numerics
def test_to_hf_model_and_lm_loss_match() -> None:
    cfg = CONFIGS["base"]
    ours, ids = _ours(cfg), _ids()
    hf = to_hf_model(ours)
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)  # we shift; transformers shifts itself
    with torch.no_grad():
        a, b = ours(ids, labels, return_logits=True), hf(ids, labels=ids)
    assert_close_scaled(a.logits, b.logits, "logits", rel=LOGITS_REL)
    assert_close_scaled(a.lm_loss, b.loss, "lm_loss", rel=LOSS_REL)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["base", "top1_mqa_3experts_tied", "5experts_top3_window_headdim"])
def test_aux_loss_matches_load_balancing_loss_func(name: str) -> None:
    cfg = dataclasses.replace(CONFIGS[name], moe=MoEConfig(aux_loss_type="mixtral"))
    ours, ids = _ours(cfg), _ids()
    hf = to_hf_model(ours)
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)
    with torch.no_grad():
        a = ours(ids, labels)
        b = hf(ids, output_router_logits=True)
        direct = transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func(
            b.router_logits, cfg.num_experts, cfg.top_k
        )
    assert len(b.router_logits) == cfg.num_layers
    assert_close_scaled(a.aux_loss, b.aux_loss, "aux_loss vs transformers' output", rel=LOSS_REL)
    assert_close_scaled(a.aux_loss, direct, "aux_loss vs load_balancing_loss_func", rel=LOSS_REL)


def test_state_dict_round_trip_is_exact() -> None:
    # renaming, views and stacking copy values: exact
    for name, cfg in CONFIGS.items():
        sd = _ours(cfg).state_dict()
        back = from_mixtral_state_dict(to_mixtral_state_dict(sd))
        assert back.keys() == sd.keys(), name
        for k in sd:
            assert torch.equal(back[k], sd[k]), (name, k)


def test_tied_lm_head_filled_in_when_absent() -> None:
    cfg = CONFIGS["top1_mqa_3experts_tied"]
    sd = dict(_ours(cfg).state_dict())
    del sd["lm_head.weight"]  # what a checkpoint file holds for tied embeddings
    hf_sd = to_mixtral_state_dict(sd)
    assert torch.equal(hf_sd["lm_head.weight"], sd["embed.weight"])


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["base", "top1_mqa_3experts_tied", "dense_mistral"])
def test_import_from_transformers_checkpoint_files(name: str, tmp_path) -> None:
    """A transformers-initialised model, saved in its on-disk (per-expert) names, imports into ours."""
    cfg = CONFIGS[name]
    hf_cfg = to_hf_config(cfg)
    torch.manual_seed(3)
    hf = getattr(transformers, hf_architecture(cfg))(hf_cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    if cfg.num_experts:
        assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in on_disk)
    ours_cfg = from_hf_config(transformers.AutoConfig.from_pretrained(tmp_path))
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_size"):
        assert getattr(ours_cfg, f) == getattr(cfg, f), f
    assert (ours_cfg.num_experts, ours_cfg.top_k, ours_cfg.tie_embeddings) == (
        cfg.num_experts,
        cfg.top_k,
        cfg.tie_embeddings,
    )
    ours = MoETransformer(ours_cfg).eval()
    ours.load_state_dict(from_mixtral_state_dict(on_disk), strict=True)
    ids = _ids()
    with torch.no_grad():
        assert_close_scaled(ours(ids).logits, hf(ids).logits, f"{name} logits", rel=LOGITS_REL)
    # the in-memory names import too
    ours.load_state_dict(from_mixtral_state_dict(hf.state_dict()), strict=True)


def test_config_fields() -> None:
    cfg = _cfg(
        sliding_window=7,
        rope_theta=5e5,
        norm_eps=1e-6,
        tie_embeddings=True,
        moe=MoEConfig(aux_loss_type="mixtral", aux_loss_weight=0.02, jitter_eps=0.01),
    )
    hc = to_mixtral_config(cfg)
    assert (hc.vocab_size, hc.hidden_size, hc.intermediate_size) == (VOCAB, 32, 48)
    assert (hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim) == (2, 4, 2, 8)
    assert (hc.num_local_experts, hc.num_experts_per_tok) == (4, 2)
    assert hc.rope_parameters["rope_theta"] == 5e5 and hc.rope_parameters["rope_type"] == "default"
    assert (hc.rms_norm_eps, hc.sliding_window, hc.tie_word_embeddings) == (1e-6, 7, True)
    assert (hc.max_position_embeddings, hc.router_aux_loss_coef, hc.router_jitter_noise) == (64, 0.02, 0.01)
    assert hc.output_router_logits is False and hc.attention_dropout == 0.0
    assert hc.bos_token_id is None and hc.eos_token_id is None
    # switch loss is 1/top_k of Mixtral's for one layer: the coefficient compensates
    # 0.02 / 2 in float64: exact up to the last bit
    assert to_mixtral_config(_cfg(moe=MoEConfig(aux_loss_weight=0.02))).router_aux_loss_coef == pytest.approx(
        0.01, rel=1e-15
    )


def test_refusals_and_warnings() -> None:
    with pytest.raises(ValueError, match="MoE FFN in every layer") as e:
        to_mixtral_config(_cfg(moe_every=2, num_layers=2))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        to_mixtral_config(_cfg(num_experts=0))
    with pytest.raises(ValueError, match="normalize_top_k"):
        to_mixtral_config(_cfg(moe=MoEConfig(normalize_top_k=False)))
    with pytest.warns(UserWarning, match="dropless"):
        to_mixtral_config(_cfg(moe=MoEConfig(capacity_factor=1.25)))
    with pytest.raises(ValueError, match="not a MoETransformer"):
        to_mixtral_state_dict({"bogus.weight": torch.zeros(1)})
