"""Packing: no token lost, exact block count, per-block domains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrain.data import DataError
from moetrain.data.packing import pack


def test_pack_small_example() -> None:
    # docs of 3, 4, 5 tokens (EOS included), seq_len 3 -> blocks of 4: 12 tokens -> 3 blocks, no remainder.
    lengths = np.array([3, 4, 5])
    ids = np.arange(12)
    packed = pack(ids, lengths, np.array([0, 1, 2]), seq_len=3, domains=["a", "b", "c"])
    assert packed.blocks_NL.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    # block starts at tokens 0, 4, 8 -> docs 0 (0..2), 1 (3..6), 2 (7..11)
    assert packed.domain_N.tolist() == [0, 1, 2]
    assert packed.tokens_per_domain == {"a": 3, "b": 4, "c": 5}
    block, domain = packed[1]
    assert block.dtype == torch.long and block.shape == (4,) and domain == 1


def test_pack_too_long_seq_len_names_token_count() -> None:
    with pytest.raises(DataError, match=r"seq_len=100 .* has only 12 tokens") as e:
        pack(np.arange(12), np.array([12]), np.array([0]), seq_len=100, domains=["a"])
    assert "\n" not in str(e.value)


def test_fixture_packing_loses_no_tokens(fixture_bundle) -> None:
    from moetrain.data.corpus import read_jsonl
    from moetrain.data.datasets import FIXTURE_DIR

    tok = fixture_bundle.tokenizer
    for split, packed in (("train", fixture_bundle.train), ("validation", fixture_bundle.validation)):
        docs = read_jsonl(FIXTURE_DIR / f"{split}.jsonl")
        stream = []
        for d in docs:
            stream += tok(d["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        block = packed.seq_len + 1
        assert packed.seq_len == 64 and packed.blocks_NL.shape[1] == block
        assert len(packed) == len(stream) // block
        assert packed.num_tokens == len(stream) == len(packed) * block + len(stream) % block
        assert packed.blocks_NL.flatten().tolist() == stream[: len(packed) * block]
        assert stream.count(tok.eos_token_id) == len(docs) == packed.num_documents
        assert sum(packed.tokens_per_domain.values()) == len(stream)
        assert set(packed.domain_N.tolist()) == {0, 1, 2}
    assert fixture_bundle.domains == ["code", "docs", "literature"]
