"""Document masking (data.document_masking): packed documents do not see each other.

- leakage: changing every token of the first document of a block leaves the logits and the loss of
  the second document unchanged (to rounding), and without masking it does not (negative control);
- positions restart per document: a document's logits inside a packed block equal its logits alone;
- the mask keeps the sliding window; the helpers' ids and positions on a hand-made block.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.config import MLAConfig
from moetrain.data.loader import document_ids
from moetrain.model.documents import document_mask, document_positions
from moetrain.model.transformer import MoETransformer
from moetrain.testing import tiny_model_config

EOS = 0
# Bounds: the same computation on other rows of the batch (MoE GEMMs see other row counts per expert
# when routing changes elsewhere, so rows round differently: ~1e-7 here); a leak moves logits by ~1e-2.
ROUNDING = 2e-5
LEAK = 1e-3


def _model(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(tiny_model_config(**overrides)).eval()


def _block(len_a: int, len_b: int, seed: int) -> torch.Tensor:
    """[1, len_a + len_b]: document A (non-EOS tokens, then EOS), then document B likewise."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(1, 97, (len_a - 1,), generator=g).tolist() + [EOS]
    b = torch.randint(1, 97, (len_b - 1,), generator=g, dtype=torch.long)
    b = b.tolist() + [EOS]
    return torch.tensor([a + b])


def test_document_ids_and_positions():
    ids = torch.tensor([[5, 6, 0, 7, 0, 0, 8, 9]])
    docs = document_ids(ids, eos_id=0)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]  # an EOS belongs to the document it ends
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    mask = document_mask(docs)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask.diagonal().all()
    windowed = document_mask(torch.zeros(1, 6, dtype=torch.int32), window=2)[0, 0]
    assert windowed[5].tolist() == [False, False, False, False, True, True]


def _second_doc_outputs(model, block, masked: bool, len_a: int):
    ids, labels = block[:, :-1], block[:, 1:]
    docs = document_ids(ids, EOS) if masked else None
    with torch.no_grad():
        logits = model(ids, return_logits=True, document_ids_BT=docs).logits
        b_labels = labels.clone()
        b_labels[:, :len_a] = -100  # the loss of document B's tokens only
        loss = model(ids, b_labels, document_ids_BT=docs).lm_loss
    return logits[:, len_a:], loss


# gpt-oss's attention (sinks, a sliding layer then a full one) and DeepSeek-V3's latent attention.
GPT_OSS = {
    "attention_sinks": True,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"],
}
MLA = {
    "mla": MLAConfig(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10)
}
SHAPES = {"plain": {}, "window": {"sliding_window": 8}, "gpt_oss": GPT_OSS, "mla": MLA}


@pytest.mark.numerics
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_changing_document_a_leaves_document_b_unchanged(shape):
    model = _model(**SHAPES[shape])
    len_a, len_b = 13, 20
    block = _block(len_a, len_b + 1, seed=1)
    changed = block.clone()
    changed[0, : len_a - 1] = (block[0, : len_a - 1] + 17) % 96 + 1  # every token of A but its EOS
    assert (changed[0, : len_a - 1] != block[0, : len_a - 1]).all()

    logits, loss = _second_doc_outputs(model, block, True, len_a)
    logits2, loss2 = _second_doc_outputs(model, changed, True, len_a)
    assert (logits - logits2).abs().max() < ROUNDING
    assert abs(float(loss - loss2)) < ROUNDING

    # negative control: the same change without masking reaches document B
    plain, plain_loss = _second_doc_outputs(model, block, False, len_a)
    plain2, plain_loss2 = _second_doc_outputs(model, changed, False, len_a)
    assert (plain - plain2).abs().max() > LEAK
    assert abs(float(plain_loss - plain_loss2)) > LEAK * 1e-2


@pytest.mark.numerics
def test_positions_restart_per_document():
    """Document B inside a packed block computes as if it started the sequence (same logits)."""
    model = _model()
    len_a, len_b = 11, 16
    block = _block(len_a, len_b, seed=2)
    ids = block
    with torch.no_grad():
        packed = model(ids, return_logits=True, document_ids_BT=document_ids(ids, EOS)).logits
        alone = model(ids[:, len_a:], return_logits=True).logits
        shifted = model(ids, return_logits=True).logits  # no masking: B sees A, positions continue
    assert (packed[:, len_a:] - alone).abs().max() < ROUNDING
    assert (shifted[:, len_a:] - alone).abs().max() > LEAK
    # the first document is unaffected by masking (it is a prefix: same causal context)
    assert (packed[:, :len_a] - shifted[:, :len_a]).abs().max() < ROUNDING


def test_masking_with_activation_checkpointing_trains_the_same():
    """Gradients through the masked forward are the same with activation checkpointing."""
    block = _block(9, 24, seed=3)
    ids, labels = block[:, :-1], block[:, 1:]
    docs = document_ids(ids, EOS)
    grads = []
    for ckpt in (False, True):
        model = _model().train()
        model.activation_checkpointing = ckpt
        model(ids, labels, document_ids_BT=docs).lm_loss.backward()
        grads.append(model.embed.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_document_ids_with_a_kv_cache_is_refused():
    from moetrain.model.attention import KVCache

    model = _model()
    ids = _block(4, 4, seed=4)
    with pytest.raises(ValueError, match="KV cache"):
        model(ids, caches=[KVCache() for _ in model.layers], document_ids_BT=document_ids(ids, EOS))


@pytest.mark.numerics
@pytest.mark.parametrize("shape", ["gpt_oss", "mla"])
def test_one_document_is_each_layers_own_mask(shape):
    """A block that is one document: the masked forward equals the unmasked one, so each layer kept its
    own mask (gpt-oss: the window on its sliding layer only, the sinks; MLA: causal)."""
    model = _model(**SHAPES[shape])
    ids = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(ids, return_logits=True).logits
        one = model(ids, return_logits=True, document_ids_BT=torch.zeros_like(ids)).logits
    assert (plain - one).abs().max() < ROUNDING
    if shape == "gpt_oss":  # negative control: the window on every layer (one mask for all) differs
        model.layers[1].window = 8
        with torch.no_grad():
            windowed = model(ids, return_logits=True, document_ids_BT=torch.zeros_like(ids)).logits
        assert (windowed - plain).abs().max() > LEAK
