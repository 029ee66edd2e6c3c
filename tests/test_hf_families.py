"""Eight families from transformers (Mixtral, Mistral, OLMoE, Qwen2-MoE, Qwen3-MoE, GLM-4.5, gpt-oss,
DeepSeek-V3): a tiny random model
saved with ``save_pretrained`` loads through ``model.init_from``'s path (config -> ours, weights checked
by name, read per rank) and computes transformers' logits; exported back, transformers loads it as the
same architecture with our logits, and greedy decoding agrees token for token."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moetrain.config import ConfigError, TrainConfig
from moetrain.distributed.expert_parallel import build_model
from moetrain.generate import generate_tokens
from moetrain.hf import from_hf_state_dict, hf_architecture, hf_model_from_state
from moetrain.pretrained import load_pretrained, resolve_pretrained
from moetrain.testing import HF_FAMILIES, assert_close_scaled, rounding_rel, tiny_hf_model

FAMILIES = ["mixtral", "mistral", "olmoe", "qwen2_moe", "qwen3_moe", "glm4_moe", "gpt_oss", "deepseek_v3"]
B, T, VOCAB = 2, 16, 512
# Same function, other kernels (transformers' expert loop vs our grouped_mm, eager vs SDPA attention):
# logits agree to rounding, 64 ulps of their scale (~7.6e-6 relative; they are O(1), so well under
# 1e-5 absolute). A wrong mapping (swapped gate/up, a missing bias or QK-norm, renormalised top-k where
# the family does not renormalise) is off by ~1e-2 of the scale or more.
LOGITS_REL = rounding_rel(64)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _train_cfg(folder: Path, **model: object) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.vocab_size, cfg.data.seq_len = VOCAB, 32  # our BPE fits the tiny vocab (no tokenizer saved)
    cfg.model.init_from = str(folder)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def load_ours(folder: Path, ep_rank: int = 0, ep_size: int = 1, overrides: list[str] | None = None):
    """What the trainer does with model.init_from=folder, on one rank."""
    cfg = _train_cfg(folder)
    resolve_pretrained(cfg, overrides or [])
    torch.manual_seed(0)
    model = build_model(SimpleNamespace(model=cfg.model), torch.device("cpu"), ep_rank, ep_size)
    load_pretrained(model, folder)
    return model.eval(), cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (folder, transformers model); (family, tied) -> the same with or without tied embeddings
    (every family allows both)."""
    out = {}
    for fam in FAMILIES:
        for tie in (False, True):
            folder = tmp_path_factory.mktemp(f"{fam}-tied" if tie else fam)
            out[(fam, tie)] = (folder, tiny_hf_model(fam, folder, tie_word_embeddings=tie))
        out[fam] = out[(fam, False)]
    return out


def _assert_tie(model, tie: bool) -> None:  # noqa: ANN001
    assert (model.lm_head.weight is model.embed.weight) == tie  # one tensor, or two


@pytest.mark.numerics
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_init_from_computes_transformers_logits(saved, family: str, tie: bool) -> None:
    folder, hf = saved[(family, tie)]
    ours, cfg = load_ours(folder)
    _assert_tie(ours, tie)
    assert cfg.model.tie_embeddings == tie
    assert hf_architecture(cfg.model) == HF_FAMILIES[family][1]  # exports as what it came from
    with torch.no_grad():
        a, b = ours(_ids()).logits, hf(_ids()).logits
    assert_close_scaled(a, b, f"{family} logits", rel=LOGITS_REL)


@pytest.mark.numerics
def test_family_options_matter(saved) -> None:
    """Negative control: the same weights without the family's own option compute something else,
    far outside the bound above (so the parity tests could fail)."""
    for family, change in (
        ("olmoe", {"qk_norm": "none"}),
        ("qwen3_moe", {"qk_norm": "none"}),
        ("qwen2_moe", {"shared_expert_gate": False}),
    ):
        folder, hf = saved[family]
        ours, cfg = load_ours(folder)
        for k, v in change.items():
            setattr(cfg.model, k, v)
        from moetrain.model import MoETransformer

        other = MoETransformer(cfg.model).eval()
        state = {k: v for k, v in ours.state_dict().items() if k in other.state_dict()}
        other.load_state_dict(state, strict=False)
        with torch.no_grad():
            b = hf(_ids()).logits
            diff = (other(_ids()).logits - b).abs().max().item()
        assert diff > 1e3 * LOGITS_REL * b.abs().max().item(), (family, diff)
    folder, hf = saved["olmoe"]
    ours, cfg = load_ours(folder)
    ours.moe_layers[0].router.normalize_top_k = True  # OLMoE does not renormalise
    with torch.no_grad():
        diff = (ours(_ids()).logits - hf(_ids()).logits).abs().max().item()
    assert diff > 1e-3, diff


def _plain_rope(m) -> None:  # noqa: ANN001
    """The loaded model's RoPE without its model.rope_scaling (YaRN in the gpt-oss / DeepSeek-V3 fixtures)."""
    from moetrain.model.rope import RotaryEmbedding

    assert m.cfg.rope_scaling and m.cfg.rope_scaling["rope_type"] == "yarn"  # what init_from read
    m.rope = RotaryEmbedding(m.rope.head_dim, m.cfg.max_seq_len, m.cfg.rope_theta)


@pytest.mark.numerics
def test_glm4_moe_options_matter(saved) -> None:
    """Negative control for GLM-4.5: each DeepSeek-V3 router option and partial RoPE, switched off on
    the loaded model, moves the logits far outside the parity bound."""
    folder, hf = saved["glm4_moe"]
    with torch.no_grad():
        want = hf(_ids()).logits
    scale = want.abs().max().item()

    def router(m, **kw):
        for layer in m.moe_layers:
            for k, v in kw.items():
                setattr(layer.router, k, v)

    def full_rope(m):
        from moetrain.model.layers import RotaryEmbedding

        m.rope = RotaryEmbedding(m.cfg.head_size, m.cfg.max_seq_len, m.cfg.rope_theta)

    def no_bias(m):
        for layer in m.moe_layers:
            layer.router.expert_bias.zero_()

    for change in (
        lambda m: router(m, routed_scaling_factor=1.0),
        lambda m: router(m, n_group=1, topk_group=1),
        no_bias,
        full_rope,
    ):
        ours, _ = load_ours(folder)
        with torch.no_grad():
            change(ours)
            diff = (ours(_ids()).logits - want).abs().max().item()
        assert diff > 1e3 * LOGITS_REL * scale, diff


@pytest.mark.numerics
def test_deepseek_v3_options_matter(saved) -> None:
    """Negative control for DeepSeek-V3's attention: plain (not interleaved) rotary pairs, the latent
    norms at the model's eps instead of 1e-6, the group limits off, plain RoPE instead of YaRN or the
    softmax scale without YaRN's mscale^2 move the logits."""
    folder, hf = saved["deepseek_v3"]
    with torch.no_grad():
        want = hf(_ids()).logits
    scale = want.abs().max().item()

    def each(m, fn):
        for b in m.layers:
            fn(b.attention)

    # The tiny model's attention is near uniform (0.02-std weights, 8 rotary dims), so the rotary layout
    # moves the logits less than the other options: still 160x the parity bound.
    for change, margin in (
        (lambda m: each(m, lambda a: setattr(a, "interleave", False)), 100),
        (lambda m: each(m, lambda a: setattr(a.kv_a_layernorm, "eps", 0.5)), 1e3),
        (lambda m: [setattr(x.router, "n_group", 1) for x in m.moe_layers], 1e3),
        (_plain_rope, 100),  # the fixture's YaRN tables
        (
            lambda m: each(m, lambda a: setattr(a, "softmax_scale", (a.nope + a.rope) ** -0.5)),
            100,
        ),  # no mscale^2
    ):
        ours, _ = load_ours(folder)
        with torch.no_grad():
            change(ours)
            diff = (ours(_ids()).logits - want).abs().max().item()
        assert diff > margin * LOGITS_REL * scale, diff


@pytest.mark.numerics
def test_gpt_oss_options_matter(saved) -> None:
    """Negative control for gpt-oss: without the sinks, with one window for all layers, with the clamp at
    7 (the fixture clamps at 0.1), with gate / up swapped (the interleaving) or without the experts'
    biases, or with plain RoPE instead of YaRN, the logits move far outside the parity bound."""
    folder, hf = saved["gpt_oss"]
    with torch.no_grad():
        want = hf(_ids()).logits
    scale = want.abs().max().item()

    def attn(m, **kw):
        for b in m.layers:
            for k, v in kw.items():
                setattr(b.attention, k, v)

    def experts(m, fn):
        for layer in m.moe_layers:
            fn(layer.experts)

    def swap(e):
        e.w1, e.v1 = e.v1, e.w1

    # The tiny model's attention is near uniform (0.02-std weights), so the rotary tables move the logits
    # less than the other options: still 30x the parity bound.
    for change, margin in (
        (lambda m: attn(m, sinks=None), 1e3),
        (lambda m: attn(m, sliding_window=None), 1e3),
        (lambda m: experts(m, lambda e: setattr(e, "limit", 7.0)), 1e3),
        (lambda m: experts(m, swap), 1e3),
        (lambda m: experts(m, lambda e: e.w2_bias.zero_()), 1e3),
        (_plain_rope, 30),  # the fixture's YaRN
    ):
        ours, _ = load_ours(folder)
        with torch.no_grad():
            change(ours)
            diff = (ours(_ids()).logits - want).abs().max().item()
        assert diff > margin * LOGITS_REL * scale, diff


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "glm4_moe", "gpt_oss", "deepseek_v3"])
def test_expert_parallel_rank_reads_its_slice_of_a_sharded_checkpoint(tmp_path: Path, family: str) -> None:
    """A checkpoint in several files (index.json): each ep rank holds exactly its experts."""
    tiny_hf_model(family, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    full, _ = load_ours(tmp_path)
    for rank in range(2):
        shard, _ = load_ours(tmp_path, ep_rank=rank, ep_size=2)
        ref = full.state_dict()
        for name, t in shard.state_dict().items():
            want = ref[name]
            if name.rsplit(".", 1)[-1] in ("w1", "v1", "w2", "w1_bias", "v1_bias", "w2_bias"):
                El = want.shape[0] // 2  # this rank's experts
                want = want[El * rank : El * rank + El]
            assert torch.equal(t, want), name


def _greedy_hf(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)


@pytest.mark.numerics
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_as_the_source_architecture(saved, family: str, tie: bool, tmp_path: Path) -> None:
    folder, _ = saved[(family, tie)]
    ours, cfg = load_ours(folder)
    with torch.no_grad():  # trained weights differ from the source: move them off the saved values
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    _assert_tie(ours, tie)
    hf_model_from_state(cfg.model, ours.state_dict()).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [HF_FAMILIES[family][1]]
    assert config["tie_word_embeddings"] == tie
    assert ("lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))) == (not tie)  # stored once
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(back).__name__ == HF_FAMILIES[family][1]
    with torch.no_grad():
        assert_close_scaled(ours(_ids()).logits, back(_ids()).logits, f"{family} exported", rel=LOGITS_REL)
    prompt = _ids(5)[:1, :4]
    want = _greedy_hf(back, prompt, 12)
    got = generate_tokens(ours, prompt, 12, temperature=0.0)
    assert got.tolist() == want.tolist()


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
            r"experts\.v1 \(expert 3\) is missing",
        ),
        (
            lambda s: s.pop("model.layers.0.self_attn.q_norm.weight"),
            r"layers\.0\.attention\.q_norm\.weight is missing",
        ),
        (
            lambda s: s.update({"model.layers.0.mlp.foo.weight": torch.zeros(2)}),
            r"mlp\.foo\.weight is unexpected",
        ),
        (
            lambda s: s.update({"model.layers.0.mlp.experts.7.up_proj.weight": torch.zeros(48, 32)}),
            r"experts\.7\.up_proj\.weight is unexpected: the model has 4 experts",
        ),
        (
            lambda s: s.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 33)}),
            r"k_proj\.weight has shape \[16, 33\], expected \[16, 32\]",
        ),
    ],
    ids=["missing-expert", "missing-qk-norm", "unexpected", "expert-out-of-range", "wrong-shape"],
)
def test_load_is_checked_name_by_name(tmp_path: Path, edit, message: str) -> None:
    tiny_hf_model("olmoe", tmp_path)
    _edit_weights(tmp_path, edit)
    with pytest.raises(ConfigError, match=message) as e:
        resolve_pretrained(_train_cfg(tmp_path), [])
    assert "\n" not in str(e.value)


def test_shape_overrides_that_contradict_the_checkpoint_are_rejected(saved) -> None:
    folder, _ = saved["qwen3_moe"]
    with pytest.raises(
        ConfigError, match=r"model\.hidden_size=64 contradicts model\.init_from.*hidden_size=32"
    ):
        resolve_pretrained(_train_cfg(folder), ["model.hidden_size=64"])
    with pytest.raises(ConfigError, match=r"model\.moe\.normalize_top_k=False contradicts"):
        resolve_pretrained(_train_cfg(folder), ["model.moe.normalize_top_k=false"])
    # the same value, and training options, are fine; training options stay ours
    cfg = _train_cfg(folder)
    cfg.model.moe.aux_loss_weight, cfg.model.moe.capacity_factor = 0.05, 1.5
    resolve_pretrained(cfg, ["model.hidden_size=32", "model.moe.aux_loss_weight=0.05", "model.num_layers=3"])
    assert (cfg.model.moe.aux_loss_weight, cfg.model.moe.capacity_factor) == (0.05, 1.5)
    assert (cfg.model.num_experts, cfg.model.qk_norm, cfg.model.moe_layer_ids) == (4, "per_head", [1])


def test_bad_sources_are_one_line_errors(tmp_path: Path, saved) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        resolve_pretrained(_train_cfg(tmp_path / "nope"), [])
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_pretrained(_train_cfg(tmp_path), [])
    folder, _ = saved["mixtral"]
    cfg = _train_cfg(folder)
    cfg.data.vocab_size = 8192
    with pytest.raises(
        ConfigError, match=r"data\.vocab_size=8192 is larger than the checkpoint's vocab_size=512"
    ):
        resolve_pretrained(cfg, [])
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2)).save_pretrained(gpt2)
    with pytest.raises(ConfigError, match="model_type='gpt2' is not supported"):
        resolve_pretrained(_train_cfg(gpt2), [])


def test_from_hf_state_dict_accepts_in_memory_names(saved) -> None:
    for family in ("olmoe", "qwen2_moe"):
        folder, hf = saved[family]
        ours, _ = load_ours(folder)
        mapped = from_hf_state_dict(hf.state_dict())
        for k, v in ours.state_dict().items():
            assert torch.equal(mapped[k], v), (family, k)


def test_multi_token_prediction_layers_are_skipped(saved, tmp_path: Path) -> None:
    """DeepSeek-V3 / GLM-4.5 checkpoints hold their MTP module as layer num_hidden_layers (with names of
    its own); init_from skips it, as transformers does, and still refuses any other extra tensor."""
    folder, _ = saved["deepseek_v3"]
    state = load_file(str(folder / "model.safetensors"))
    n = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    state[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(4, 8)
    state[f"model.layers.{n}.self_attn.kv_b_proj.weight"] = torch.zeros(4, 8)
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    save_file(state, str(tmp_path / "model.safetensors"))
    ours, _ = load_ours(tmp_path)
    assert len(ours.layers) == n
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ConfigError, match=f"model.layers.{n}"):
        load_ours(tmp_path)
