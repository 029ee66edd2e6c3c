"""The decoder: shapes, causality, sliding window, KV cache, checkpointing, dense/interleaved, params."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import MoETransformer
from moetrain.model.attention import KVCache
from moetrain.model.layers import SwiGLU
from moetrain.moe import MoELayer

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
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    # at init the LM loss is close to ln V (near-uniform predictions)
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5
    for s in out.router_stats:
        assert s.num_tokens == 30 and s.tokens_per_expert_E.sum().item() == 60


def test_ignore_index_labels(seed):
    model = MoETransformer(tiny())
    x = ids(1, 8)
    labels = x.clone()
    labels[0, :4] = -100
    out = model(x, labels_BT=labels)
    want = torch.nn.functional.cross_entropy(out.logits[0, 4:], x[0, 4:])
    assert out.lm_loss.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("cfg_kw", [{}, {"num_experts": 0}, {"sliding_window": 3}])
def test_causal(seed, cfg_kw):
    model = MoETransformer(tiny(**cfg_kw)).eval()
    x = ids(2, 12)
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % V
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().amax(-1).min() > 0  # every later position sees the change


@pytest.mark.parametrize("num_layers", [1, 2])
def test_sliding_window_limits_receptive_field(seed, num_layers):
    W, T, p = 3, 16, 2
    model = MoETransformer(tiny(sliding_window=W, num_layers=num_layers)).eval()
    x = ids(1, T)
    y = x.clone()
    y[0, p] = (y[0, p] + 1) % V
    diff = (model(x).logits - model(y).logits)[0].abs().amax(-1)
    reach = p + num_layers * (W - 1)  # each layer sees W - 1 positions back
    assert torch.all(diff[:p] == 0)
    assert torch.all(diff[p : reach + 1] > 0)
    assert torch.all(diff[reach + 1 :] == 0), diff


def test_window_larger_than_sequence_is_plain_causal(seed):
    a = MoETransformer(tiny())
    b = MoETransformer(tiny(sliding_window=32))
    b.load_state_dict(a.state_dict())
    x = ids(2, 12)
    torch.testing.assert_close(a(x).logits, b(x).logits)


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
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


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
    assert losses[0].item() == losses[1].item()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


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
    torch.testing.assert_close(clone.lm_head.weight, model.embed.weight)


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
    assert model.layers[0].attention.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert model.layers[0].ffn.experts.w2.std().item() == pytest.approx(out_std, rel=0.1)
    assert model.layers[0].ffn.experts.w1.std().item() == pytest.approx(0.05, rel=0.1)
    assert model.layers[0].attention_norm.weight.eq(1).all()
