"""The builtin BPE: deterministic training, exact round trips, specials."""

from __future__ import annotations

from pathlib import Path

import pytest

from moetrain.data.cache import sha256_file
from moetrain.data.corpus import read_jsonl
from moetrain.data.datasets import FIXTURE_DIR
from moetrain.data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_or_train_tokenizer

from .conftest import fixture_config


def _train(data_dir: Path):
    texts = [d["text"] for d in read_jsonl(FIXTURE_DIR / "train.jsonl")]
    return load_or_train_tokenizer(fixture_config(data_dir), texts, corpus_key="fixture-test", verbose=False)


def test_training_is_deterministic(tmp_path: Path) -> None:
    _train(tmp_path / "a")
    _train(tmp_path / "b")
    dirs = [tmp_path / x / "tokenizers" / "fixture-test-bpe512" for x in ("a", "b")]
    files = sorted(p.name for p in dirs[0].iterdir())
    assert "tokenizer.json" in files and files == sorted(p.name for p in dirs[1].iterdir())
    assert [sha256_file(dirs[0] / f) for f in files] == [sha256_file(dirs[1] / f) for f in files]


def test_cached_tokenizer_is_reused(tmp_path: Path) -> None:
    first = _train(tmp_path)
    again = load_or_train_tokenizer(
        fixture_config(tmp_path), iter(()), corpus_key="fixture-test", verbose=False
    )
    assert again.get_vocab() == first.get_vocab()


def test_specials_and_size(fixture_bundle) -> None:
    tok = fixture_bundle.tokenizer
    assert len(tok) == 512
    assert tok.eos_token == tok.bos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id != tok.pad_token_id
    assert tok("abc")["input_ids"] == tok("abc", add_special_tokens=False)["input_ids"]  # nothing added


@pytest.mark.parametrize(
    "text",
    [
        "To be, or not to be: that is the question.",
        "  leading and trailing spaces  ",
        "tabs\tand\r\nwindows\nnewlines\n\n\n",
        "def f(x: int) -> int:\n    return x ** 2  # comment\n",
        "unicode: héllo, ünïcödé, 日本語, emoji 🙂🚀, zero\u200bwidth",
        "special-looking <|endoftext|> text",
        "",
    ],
)
def test_round_trip_is_exact(fixture_bundle, text: str) -> None:
    tok = fixture_bundle.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
