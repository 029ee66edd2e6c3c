"""The tokenizer: a byte-level BPE trained on the corpus, or any ``AutoTokenizer``.

The builtin BPE is byte-level (every string encodes, and decodes back to itself exactly), has no
prefix space or offset trimming (so round trips are exact), and two special tokens:
``<|endoftext|>`` (id 0; eos and bos) and ``<|pad|>`` (id 1). Training is deterministic for a given
corpus and vocabulary size, and the result is cached with ``save_pretrained`` under
``<data_dir>/tokenizers/<corpus>-<fingerprint>-bpe<vocab>/``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moetrain.config import DataConfig
from moetrain.data.cache import atomic_dir, resolve_data_dir
from moetrain.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
MAX_TRAIN_CHARS = 200_000_000  # BPE merges settle long before this; bounds time on big datasets


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (in the given order) and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(_capped(texts, MAX_TRAIN_CHARS), trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,  # would rewrite " ," to "," on decode
        model_max_length=sys.maxsize,  # we pack documents ourselves; silence length warnings
    )


def _capped(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        total += len(text)
        yield text


def tokenizer_dir(data_dir: str | Path | None, corpus_key: str, vocab_size: int) -> Path:
    return resolve_data_dir(data_dir) / "tokenizers" / f"{corpus_key}-bpe{vocab_size}"


def load_or_train_tokenizer(
    cfg: DataConfig,
    texts: Iterable[str] | None = None,
    *,
    corpus_key: str | None = None,
    verbose: bool = True,
) -> PreTrainedTokenizerFast:
    """``AutoTokenizer.from_pretrained(cfg.tokenizer)``, or the builtin BPE for this corpus.

    For the builtin BPE, ``corpus_key`` names the training corpus (name + content fingerprint) and
    ``texts`` are its training documents; they are read only when no cached tokenizer exists.
    """
    if cfg.tokenizer is not None:
        try:
            tok = AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=False)
        except Exception as e:  # hub/network/missing-file errors come in many types
            raise DataError(f"could not load tokenizer {cfg.tokenizer!r}: {_first_line(e)}") from e
        if tok.eos_token_id is None:
            raise DataError(f"tokenizer {cfg.tokenizer!r} has no eos token; documents need one as separator")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    if corpus_key is None:
        raise ValueError("the builtin tokenizer needs corpus_key")
    path = tokenizer_dir(cfg.data_dir, corpus_key, cfg.vocab_size)
    if not (path / "tokenizer.json").is_file():
        if texts is None:
            raise ValueError(f"no builtin tokenizer trained at {path}, and no texts to train one")
        start = time.perf_counter()
        with atomic_dir(path) as tmp:
            train_bpe(texts, cfg.vocab_size).save_pretrained(tmp)
        if verbose:
            print(
                f"moetrain: trained a {cfg.vocab_size}-token BPE in {time.perf_counter() - start:.1f} s -> {path}",
                file=sys.stderr,
                flush=True,
            )
    return PreTrainedTokenizerFast.from_pretrained(path)


def is_trained(cfg: DataConfig, corpus_key: str) -> bool:
    """Whether the tokenizer ``cfg`` asks for loads without training (always, for ``data.tokenizer``)."""
    return cfg.tokenizer is not None or (tokenizer_dir(cfg.data_dir, corpus_key, cfg.vocab_size) / "tokenizer.json").is_file()


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """Content hash of the full tokenizer definition (vocab, merges, normaliser, specials)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "load_or_train_tokenizer",
    "tokenizer_fingerprint",
    "train_bpe",
    "wrap",
]
