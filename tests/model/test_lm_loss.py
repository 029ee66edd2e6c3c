"""The LM loss fused with the head (model/lm_loss.py) against the plain path, F.cross_entropy on the
materialised logits: the same loss and gradients to rounding, with ignored tokens, any chunking, a
scaled incoming gradient, no gradients under no_grad, and never an [N, V] tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.model.lm_loss import default_chunk_rows, linear_cross_entropy
from moetrain.testing import rounding_rel

N, H, V = 203, 24, 300


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100  # ignored tokens, among them the first and chunk boundaries
    return h, w, labels


def plain(h, w, labels, scale=1.0):
    loss = F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100)
    (loss * scale).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


def fused(h, w, labels, scale=1.0, chunk_rows=None):
    h.grad = w.grad = None
    loss = linear_cross_entropy(h, w, labels, chunk_rows=chunk_rows)
    (loss * scale).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.numerics
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 203, 4096])
def test_matches_cross_entropy_of_the_logits_fp32(chunk_rows):
    """Same per-token log-softmax kernel, other summation order: the loss agrees to a few ulps; the
    gradients (another rounding of softmax - onehot, and chunked sums for the weight) to <= 1.3e-6 of
    their scale (AMD EPYC, MKL default / AVX2 / COMPATIBLE); bound 3e-5. A wrong normalisation (mean
    over all tokens, ignored ones included) is off by 25%."""
    h, w, labels = inputs()
    want = plain(h, w, labels, scale=3.0)
    got = fused(h, w, labels, scale=3.0, chunk_rows=chunk_rows)
    assert got[0].item() == pytest.approx(want[0].item(), rel=rounding_rel(16))
    assert rel_err(got[1], want[1]) < 3e-5
    assert rel_err(got[2], want[2]) < 3e-5
    assert want[1][::5].abs().max() == 0 and got[1][::5].abs().max() == 0  # ignored tokens: no gradient


@pytest.mark.numerics
def test_matches_cross_entropy_of_the_logits_bf16():
    """bf16 weights and hidden states: logits in bf16 upcast per chunk as the plain path does; the
    weight gradient summed over chunks in fp32 and rounded once. Agreement to bf16 rounding: 6e-3 of
    the scale measured (one bf16 ulp is 3.9e-3), bound 3e-2."""
    h, w, labels = inputs(torch.bfloat16, seed=1)
    want = plain(h, w, labels)
    got = fused(h, w, labels, chunk_rows=50)
    assert got[0].dtype == torch.float32
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-5)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert rel_err(got[1], want[1]) < 3e-2
    assert rel_err(got[2], want[2]) < 3e-2


def test_every_token_ignored_gives_nan_like_cross_entropy():
    h, w, labels = inputs()
    labels[:] = -100
    assert torch.isnan(F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100))
    assert torch.isnan(linear_cross_entropy(h, w, labels, chunk_rows=64))


def test_no_grad_computes_no_gradient_and_the_same_loss():
    h, w, labels = inputs()
    with_grad = linear_cross_entropy(h, w, labels, chunk_rows=64)
    with torch.no_grad():
        without = linear_cross_entropy(h, w, labels, chunk_rows=64)
    assert not without.requires_grad and with_grad.requires_grad
    assert torch.equal(without, with_grad.detach())


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_logits():
    """Forward and backward: no tensor larger than one chunk of logits (the plain path makes several
    [N, V] ones, which this check catches)."""
    h, w, labels = inputs()
    with _LargestTensor() as fused_mode:
        linear_cross_entropy(h, w, labels, chunk_rows=32).backward()
    assert fused_mode.largest == 32 * V
    h.grad = w.grad = None
    with _LargestTensor() as plain_mode:
        F.cross_entropy(h @ w.t(), labels, ignore_index=-100).backward()
    assert plain_mode.largest == N * V


def test_default_chunk_keeps_gemms_large_and_chunks_bounded():
    assert default_chunk_rows(8192) == 2048  # the default micro-batch of 8 x 256 tokens in one chunk
    assert default_chunk_rows(32_000) == 524  # ~16M logits per chunk
    assert default_chunk_rows(151_936) == 512  # large vocabularies: never fewer rows than this


def test_shape_mismatch_is_a_clear_error():
    h, w, labels = inputs()
    with pytest.raises(ValueError, match="linear_cross_entropy"):
        linear_cross_entropy(h, w, labels[:-1])


@pytest.mark.numerics
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_the_model_trains_on_the_fused_loss_as_on_the_plain_one(tie_embeddings):
    """The whole model: loss and every parameter's gradient (tied embedding and head included) from
    ``model(ids, labels)`` equal those of F.cross_entropy on the logits of ``model(ids)``, to rounding
    (router losses off: they are the same code either way)."""
    from moetrain.config import ModelConfig, MoEConfig
    from moetrain.model import MoETransformer

    cfg = ModelConfig(
        vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=32,
        num_experts=4, top_k=2, max_seq_len=32, tie_embeddings=tie_embeddings,
        moe=MoEConfig(expert_impl="loop", aux_loss_weight=0.0, z_loss_weight=0.0),
    )  # fmt: skip
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100

    out = model(ids, labels_BT=labels)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    ref = model(ids)
    lm = F.cross_entropy(ref.logits.float().reshape(-1, 96), labels.reshape(-1), ignore_index=-100)
    lm.backward()
    assert out.loss.item() == out.lm_loss.item()
    assert out.lm_loss.item() == pytest.approx(lm.item(), rel=rounding_rel(16))
    for name, p in model.named_parameters():
        assert rel_err(got[name], p.grad) < 3e-5, name
    assert model.lm_head.weight.grad.abs().max() > 0  # tied: the embedding's gradient, both uses summed


def test_model_loss_chunk_tokens_sets_the_chunks(monkeypatch):
    """``model.loss_chunk_tokens`` reaches the fused loss (null: the automatic size) and, being only a
    chunking, leaves the loss as it was to rounding. Also settable from the command line."""
    from moetrain.config import ModelConfig, MoEConfig
    from moetrain.model import MoETransformer
    from moetrain.model import lm_loss as lm_loss_module

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk_rows"])
        return linear_cross_entropy(*args, **kwargs)

    monkeypatch.setattr(lm_loss_module, "linear_cross_entropy", spy)  # LMHead's call
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    losses = []
    for chunk in (None, 7):
        cfg = ModelConfig(
            vocab_size=96, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_hidden_size=32,
            num_experts=4, top_k=2, max_seq_len=32, loss_chunk_tokens=chunk,
            moe=MoEConfig(expert_impl="loop"),
        )  # fmt: skip
        torch.manual_seed(0)
        losses.append(MoETransformer(cfg)(ids, labels_BT=ids).lm_loss.item())
    assert seen == [None, 7]
    assert losses[1] == pytest.approx(losses[0], rel=rounding_rel(16))
