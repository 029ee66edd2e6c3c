"""The decoder: shapes, causality, sliding window, KV cache, checkpointing, dense/interleaved, params."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import MoETransformer
from moetrain.model import attention as attention_mod
from moetrain.model.attention import KVCache
from moetrain.model.layers import SwiGLU
from moetrain.moe import MoELayer
from moetrain.testing import assert_close_scaled, margins_paused, rounding_rel, separation_mismatches

V = 64


def tiny(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=32,
        num_experts=4, top_k=2, max_seq_len=32, moe=MoEConfig(expert_impl="loop"),
    )  # fmt: skip
    base.update(overrides)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def ids(B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (B, T))


def test_shapes_and_outputs(seed):
    model = MoETransformer(tiny())
    x = ids(3, 10)
    out = model(x)
    assert out.logits.shape == (3, 10, V)
    assert out.loss is None and len(out.router_stats) == 2
    out = model(x, labels_BT=x)
    assert out.logits is None  # the loss is fused with the head: no logits unless asked for
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    # at init the LM loss is close to ln V (near-uniform predictions)
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5
    for s in out.router_stats:
        assert s.num_tokens == 30 and s.tokens_per_expert_E.sum().item() == 60


@pytest.mark.numerics
def test_ignore_index_labels(seed):
    model = MoETransformer(tiny())
    x = ids(1, 8)
    labels = x.clone()
    labels[0, :4] = -100
    out = model(x, labels_BT=labels, return_logits=True)
    want = torch.nn.functional.cross_entropy(out.logits[0, 4:], x[0, 4:])
    # the same per-row log-softmax of the same logits; only the mean over 4 rows (vs 4 of 8 with the
    # rest ignored) may sum in another order: a few ulps of a loss ~ln 64
    assert out.lm_loss.item() == pytest.approx(want.item(), rel=rounding_rel(8))


# ---- perturbation tests: change one token, see which positions' logits move ------------------------
# A position that must not see the change can still differ by rounding: when one token's routing
# changes, an MoE layer's GEMMs get other row counts per expert, and MKL blocks (so rounds) the other
# rows differently on some CPUs / MKL code paths (seen: 1 ulp of the logits' scale on an AMD EPYC).
# 32 ulps of the scale leaves room for deeper stacks. A position that must see it moves by at least
# 6e-3 x scale in these models (the weakest: the far edge of a 2-layer receptive field); 1e-3 x scale
# is required, so the two classes are separated by a factor of ~260, not by the last bit.
UNCHANGED_REL = rounding_rel(32)  # ~3.8e-6
CHANGED_REL = 1e-3


def perturbation_diff(model: MoETransformer, x: torch.Tensor, pos: int) -> tuple[torch.Tensor, float]:
    """Per-position max |logit difference| [B, T] when token ``pos`` changes, and the logits' scale."""
    y = x.clone()
    y[:, pos] = (y[:, pos] + 1) % V
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    return (a - b).abs().amax(-1), a.abs().max().item()


def causal_mismatches(model: MoETransformer, pos: int = 7) -> list[str]:
    diff, scale = perturbation_diff(model, ids(2, 12), pos)
    changed = torch.zeros_like(diff, dtype=torch.bool)
    changed[:, pos:] = True  # every later position sees the change, no earlier one does
    return separation_mismatches(
        diff, changed, "causality", scale=scale, same_rel=UNCHANGED_REL, changed_rel=CHANGED_REL
    )


W, T_WINDOW, P_WINDOW = 3, 16, 2


def window_mismatches(model: MoETransformer, num_layers: int) -> list[str]:
    diff, scale = perturbation_diff(model, ids(1, T_WINDOW), P_WINDOW)
    reach = P_WINDOW + num_layers * (W - 1)  # each layer sees W - 1 positions back
    changed = torch.zeros(T_WINDOW, dtype=torch.bool)
    changed[P_WINDOW : reach + 1] = True
    return separation_mismatches(
        diff[0], changed, "receptive field", scale=scale, same_rel=UNCHANGED_REL, changed_rel=CHANGED_REL
    )


@pytest.mark.numerics
@pytest.mark.parametrize("cfg_kw", [{}, {"num_experts": 0}, {"sliding_window": 3}])
def test_causal(seed, cfg_kw):
    model = MoETransformer(tiny(**cfg_kw)).eval()
    assert causal_mismatches(model) == []


@pytest.mark.numerics
@pytest.mark.parametrize("num_layers", [1, 2])
def test_sliding_window_limits_receptive_field(seed, num_layers):
    model = MoETransformer(tiny(sliding_window=W, num_layers=num_layers)).eval()
    assert window_mismatches(model, num_layers) == []


def _leaky_mask(extra_future: int, extra_past: int):
    """A broken ``_causal_mask``: lets queries see ``extra_future`` later keys / ``extra_past`` more
    earlier keys than allowed."""

    def mask(q_len, kv_len, window, device):
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        k_pos = torch.arange(kv_len, device=device)[None, :]
        m = k_pos <= q_pos + extra_future
        if window is not None:
            m &= k_pos > q_pos - window - extra_past
        return m

    return mask


@pytest.mark.numerics
def test_negative_control_causality_check_catches_a_future_leak(seed, monkeypatch):
    """The causality check, run on a model whose mask lets each query see the next token, fails."""
    monkeypatch.setattr(attention_mod, "_causal_mask", _leaky_mask(extra_future=1, extra_past=0))
    model = MoETransformer(tiny(sliding_window=3)).eval()  # window < T: the explicit-mask path
    with margins_paused():
        bad = causal_mismatches(model, pos=7)
    # 2 layers, one future key each: positions 5 and 6 of both rows saw token 7
    assert len(bad) == 1 and "positions [(0, 5), (0, 6), (1, 5), (1, 6)]" in bad[0], bad


@pytest.mark.numerics
def test_negative_control_window_check_catches_a_window_one_too_wide(seed, monkeypatch):
    monkeypatch.setattr(attention_mod, "_causal_mask", _leaky_mask(extra_future=0, extra_past=1))
    model = MoETransformer(tiny(sliding_window=W, num_layers=1)).eval()
    with margins_paused():
        bad = window_mismatches(model, num_layers=1)
    reach = P_WINDOW + (W - 1)
    assert len(bad) == 1 and f"positions [{reach + 1}]" in bad[0], bad


@pytest.mark.numerics
def test_window_larger_than_sequence_is_plain_causal(seed):
    a = MoETransformer(tiny())
    b = MoETransformer(tiny(sliding_window=32))
    b.load_state_dict(a.state_dict())
    x = ids(2, 12)
    with torch.no_grad():
        la, lb = a(x).logits, b(x).logits
    # A window the sequence never reaches may still take the explicit-mask SDPA kernel instead of
    # is_causal=True: the same attention, summed in another order (a few ulps of the logits' scale).
    assert_close_scaled(lb, la, "logits with window 32 vs none", rel=rounding_rel(16))


KV_REL = rounding_rel(64)  # ~7.6e-6


@pytest.mark.numerics
@pytest.mark.parametrize("cfg_kw", [{}, {"num_experts": 0}, {"sliding_window": 4}, {"num_kv_heads": 4}])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 3, 1, 2]], ids=["one_at_a_time", "prefill_then_chunks"])
def test_kv_cache_matches_full_forward(seed, cfg_kw, chunks):
    model = MoETransformer(tiny(**cfg_kw)).eval()
    x = ids(2, sum(chunks))
    with torch.no_grad():
        full = model(x).logits
        caches = [KVCache() for _ in model.layers]
        pieces, t = [], 0
        for n in chunks:
            pieces.append(model(x[:, t : t + n], caches=caches).logits)
            t += n
            assert all(c.length == t for c in caches)
    # Decoding with a cache runs the same math on other shapes (1..5 query rows instead of 12, an
    # explicit mask instead of is_causal, MoE batches of other sizes): rounding of a few GEMMs and a
    # softmax per layer, allowed 64 ulps of the logits' scale. A cache bug (wrong positions in RoPE,
    # a stale or missing key) moves logits by ~1e-2 x scale.
    assert_close_scaled(torch.cat(pieces, dim=1), full, "cached vs full logits", rel=KV_REL)


@pytest.mark.numerics
@pytest.mark.parametrize("cfg_kw", [{}, {"moe_every": 2, "num_layers": 4}, {"num_experts": 0}])
def test_activation_checkpointing_same_loss_and_grads(seed, cfg_kw):
    cfg = tiny(**cfg_kw, moe=MoEConfig(expert_impl="loop", jitter_eps=0.1))  # jitter: RNG must replay too
    a = MoETransformer(cfg).train()
    b = MoETransformer(cfg).train()
    b.load_state_dict(a.state_dict())
    b.activation_checkpointing = True
    x = ids(2, 10)
    losses = []
    for m in (a, b):
        torch.manual_seed(123)
        out = m(x, labels_BT=x)
        out.loss.backward()
        losses.append(out.loss)
    # the forward pass is the same sequence of operations on the same shapes (checkpointing changes
    # only what is kept for backward): bit-identical loss
    assert losses[0].item() == losses[1].item()
    # backward recomputes each block's forward (the same ops, replayed RNG) and interleaves it with the
    # gradient work; gradients are allowed a few ulps of each tensor's scale. A recomputation that
    # differs (unreplayed jitter noise, a dropped router term) moves them by far more.
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert_close_scaled(pb.grad, pa.grad, f"grad of {n}", rel=rounding_rel(16))


def test_dense_model(seed):
    model = MoETransformer(tiny(num_experts=0, dense_ffn_hidden_size=48))
    assert model.moe_layers == []
    assert all(isinstance(b.ffn, SwiGLU) and b.ffn.w1.out_features == 48 for b in model.layers)
    x = ids()
    out = model(x, labels_BT=x)
    assert out.router_stats == []
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0
    assert out.loss.item() == out.lm_loss.item()
    out.loss.backward()
    assert model.num_params(active=True) == model.num_params()


def test_interleaved_moe(seed):
    model = MoETransformer(tiny(num_layers=4, moe_every=2))
    kinds = [type(b.ffn) for b in model.layers]
    assert kinds == [SwiGLU, MoELayer, SwiGLU, MoELayer]
    x = ids()
    out = model(x, labels_BT=x)
    assert len(out.router_stats) == 2
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_tied_embeddings_share_storage(seed):
    model = MoETransformer(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    untied = MoETransformer(tiny())
    assert model.num_params() == untied.num_params() - V * 32
    x = ids()
    model(x, labels_BT=x).loss.backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    # state_dict round trip keeps them tied
    clone = MoETransformer(tiny(tie_embeddings=True))
    clone.load_state_dict(model.state_dict())
    assert clone.lm_head.weight is clone.embed.weight
    assert torch.equal(clone.lm_head.weight, model.embed.weight)  # a copy: exact


def hand_count(cfg: ModelConfig, active: bool) -> int:
    H, hd = cfg.hidden_size, cfg.head_size
    n = cfg.vocab_size * H * (1 if cfg.tie_embeddings else 2) + H  # embed (+ head) + final norm
    for i in range(cfg.num_layers):
        n += 2 * H  # two RMSNorms
        n += H * cfg.num_heads * hd * 2 + H * cfg.num_kv_heads * hd * 2  # q, o ; k, v
        if cfg.is_moe_layer(i):
            experts = cfg.top_k if active else cfg.num_experts
            n += H * cfg.num_experts + experts * 3 * H * cfg.ffn_hidden_size  # router + experts
        else:
            n += 3 * H * cfg.dense_ffn_size
    return n


@pytest.mark.parametrize(
    "cfg_kw",
    [
        {},
        {"num_layers": 4, "moe_every": 2, "dense_ffn_hidden_size": 48},
        {"num_experts": 0},
        {"tie_embeddings": True, "num_experts": 6, "top_k": 1, "head_dim": 12},
    ],
)
def test_num_params_hand_count(cfg_kw):
    cfg = tiny(**cfg_kw)
    model = MoETransformer(cfg)
    assert model.num_params() == hand_count(cfg, active=False)
    assert model.num_params(active=True) == hand_count(cfg, active=True)


def test_init_scales_residual_projections(seed):
    cfg = dataclasses.replace(tiny(num_layers=8, hidden_size=64, ffn_hidden_size=64), init_std=0.05)
    model = MoETransformer(cfg)
    out_std = 0.05 / 4  # 1 / sqrt(2 * 8)
    # sample std of >= 4096 normal draws: relative standard error ~1/sqrt(2 * 4096) = 1.1%; 10% is ~9
    # standard errors, while a wrong scaling rule is off by a factor (4 here)
    assert model.layers[0].attention.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert model.layers[0].ffn.experts.w2.std().item() == pytest.approx(out_std, rel=0.1)
    assert model.layers[0].ffn.experts.w1.std().item() == pytest.approx(0.05, rel=0.1)
    assert model.layers[0].attention_norm.weight.eq(1).all()


@pytest.fixture
def deterministic_mode():
    was = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was[0])
    torch.utils.deterministic.fill_uninitialized_memory = was[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "cfg_kw",
    [
        {"moe": MoEConfig(expert_impl="grouped_mm")},
        {"moe": MoEConfig(expert_impl="loop")},
        {"moe": MoEConfig(expert_impl="grouped_mm", capacity_factor=0.5)},  # drops: the scatter path
        {"moe": MoEConfig(expert_impl="grouped_mm"), "shared_expert_intermediate_size": 16},
        {"num_experts": 0},
    ],
    ids=["grouped_mm", "loop", "capacity_drops", "shared_expert", "dense"],
)
def test_no_op_reads_uninitialised_memory(deterministic_mode, dtype, cfg_kw):
    """The trainer turns off deterministic mode's NaN fill of new tensors (a pass over every
    allocation). That is only sound if forward and backward never read memory they did not write:
    with the fill on, such a read would put NaN into the loss or a gradient."""
    results = []
    for fill in (True, False):
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.manual_seed(0)
        model = MoETransformer(tiny(**cfg_kw)).to(dtype)
        batch = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
        out = model(batch, labels_BT=batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert torch.isfinite(out.loss), fill
        assert all(torch.isfinite(g).all() for g in grads.values()), fill
        results.append((out.loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
