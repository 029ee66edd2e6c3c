"""Sparse upcycling (``model.upcycle_from``): a dense Mistral / Llama / Qwen3 becomes an MoE whose experts
all start as the dense FFN, with a fresh router. With renormalised top-k the chosen copies' weights sum
to 1, so at step 0 the MoE computes the dense model's function; it exports as the MoE of its family."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from moetrain.config import ConfigError, TrainConfig
from moetrain.distributed.expert_parallel import build_model
from moetrain.hf import hf_architecture, hf_model_from_state
from moetrain.pretrained import load_pretrained, resolve_pretrained
from moetrain.testing import assert_close_scaled, rounding_rel, tiny_hf_model

B, T, VOCAB = 2, 16, 512
# The dense FFN's output y, computed once per chosen copy and combined as w_a y + w_b y with
# w_a + w_b = 1 (rounded): a few ulps more than the parity bound of tests/test_hf_families.py.
LOGITS_REL = rounding_rel(64)
DENSE = {"mistral": "MixtralForCausalLM", "llama": "MixtralForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def upcycle(folder: Path, ep_rank: int = 0, ep_size: int = 1, **model: object):
    cfg = TrainConfig()
    cfg.data.vocab_size, cfg.data.seq_len = VOCAB, 32
    cfg.model.upcycle_from = str(folder)
    cfg.model.num_experts, cfg.model.top_k = 4, 2
    for k, v in model.items():
        setattr(cfg.model, k, v)
    resolve_pretrained(cfg, [])
    torch.manual_seed(0)
    m = build_model(SimpleNamespace(model=cfg.model), torch.device("cpu"), ep_rank, ep_size)
    load_pretrained(m, folder, upcycle=True, noise=cfg.model.upcycle_noise)
    return m.eval(), cfg


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """family -> (folder, model); (family, tied) -> with or without tied embeddings."""
    out = {}
    for fam in DENSE:
        for tie in (False, True):
            folder = tmp_path_factory.mktemp(f"{fam}-tied" if tie else fam)
            out[(fam, tie)] = (folder, tiny_hf_model(fam, folder, tie_word_embeddings=tie))
        out[fam] = out[(fam, False)]
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", list(DENSE))
def test_step0_logits_equal_the_dense_model(dense, family: str, tie: bool, tmp_path: Path) -> None:
    folder, hf = dense[(family, tie)]
    ours, cfg = upcycle(folder)
    assert (ours.lm_head.weight is ours.embed.weight) == tie == cfg.model.tie_embeddings
    assert (cfg.model.num_experts, cfg.model.top_k, len(ours.moe_layers)) == (4, 2, 2)
    layer = ours.moe_layers[0]
    assert torch.equal(layer.experts.w1[0], layer.experts.w1[3])  # copies ...
    assert layer.router.gate.weight.abs().sum() > 0  # ... and a fresh (random) router
    with torch.no_grad():
        a, b = ours(_ids()).logits, hf(_ids()).logits
    assert_close_scaled(a, b, f"upcycled {family} vs dense", rel=LOGITS_REL)
    # exported as the MoE of its family, which transformers loads with the same function
    assert hf_architecture(cfg.model) == DENSE[family]
    hf_model_from_state(cfg.model, ours.state_dict()).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["architectures"], config["tie_word_embeddings"]) == ([DENSE[family]], tie)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert_close_scaled(back(_ids()).logits, b, f"exported upcycled {family}", rel=LOGITS_REL)


@pytest.mark.numerics
def test_without_renormalised_top_k_the_function_changes(dense) -> None:
    """Negative control: the chosen copies' softmax weights sum to < 1, so the step-0 check can fail."""
    folder, hf = dense["llama"]
    cfg = TrainConfig()
    ours, cfg = upcycle(folder)
    for layer in ours.moe_layers:
        layer.router.normalize_top_k = False
    with torch.no_grad():
        diff = (ours(_ids()).logits - hf(_ids()).logits).abs().max().item()
    assert diff > 1e3 * LOGITS_REL, diff


def test_expert_noise_is_per_expert_and_the_same_in_every_layout(dense) -> None:
    folder, _ = dense["qwen3"]
    full, _ = upcycle(folder, upcycle_noise=0.1)
    w1 = full.moe_layers[0].experts.w1
    assert not torch.equal(w1[0], w1[1])
    rel = ((w1[0] - w1[1]).std() / w1[0].std()).item()
    assert 0.05 < rel < 0.3, rel  # two independent draws of 0.1 x std: ~0.14 x std apart
    for rank in range(2):
        shard, _ = upcycle(folder, ep_rank=rank, ep_size=2, upcycle_noise=0.1)
        for name, t in shard.state_dict().items():
            want = full.state_dict()[name]
            if name.endswith(("experts.w1", "experts.v1", "experts.w2")):
                want = want[2 * rank : 2 * rank + 2]
            assert torch.equal(t, want), name


def test_upcycle_errors_are_one_line(tmp_path: Path, dense) -> None:
    moe = tmp_path / "moe"
    tiny_hf_model("mixtral", moe)
    with pytest.raises(ConfigError, match="already an MoE .*model.init_from"):
        upcycle(moe)
    folder, _ = dense["llama"]
    with pytest.raises(ConfigError, match="model.num_experts=0 is invalid"):
        upcycle(folder, num_experts=0)
    cfg = TrainConfig()
    cfg.model.init_from = cfg.model.upcycle_from = str(folder)
    with pytest.raises(ConfigError, match="choose one"):
        cfg.validate()
