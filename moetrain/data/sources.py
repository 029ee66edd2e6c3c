"""From ``data.*`` to train / validation blocks: one text source, token files, or a weighted mixture.

- a text source (builtin, fixture, a ``datasets`` loader or hub dataset): documents -> tokenizer ->
  tokenised (cached) -> packed (datasets.py, packing.py) into the packed cache, memory-mapped
  (packed_cache.py); the builtin corpus and the fixture, once packed, skip ``datasets`` entirely;
- ``tokens``: memory-mapped token files (tokens.py), with the tokenizer that wrote them;
- ``mixture``: each source built as above with one shared tokenizer, kept apart (a block never mixes
  sources) and drawn by weight in training (mixture.py); validation per source.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from moetrain.config import DataConfig
from moetrain.data.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from moetrain.data import DataBundle


def _tokens_tokenizer_cfg(cfg: DataConfig) -> DataConfig:
    """A token source's tokenizer: data.tokenizer, else the one ``prepare`` wrote beside the files."""
    from moetrain.data.tokens import tokenizer_beside

    if cfg.tokenizer is not None:
        return cfg
    beside = tokenizer_beside(cfg.data_files)
    if beside is None:
        raise DataError(
            "data.name=tokens needs data.tokenizer: the tokenizer that wrote the token ids (a folder or hub "
            "name); folders written by python -m moetrain.data.prepare carry theirs"
        )
    return replace(cfg, tokenizer=beside)


def _packed_local(cfg: DataConfig, verbose: bool) -> DataBundle | None:
    """The builtin corpus or the fixture when its blocks are already packed: read from the packed
    cache without importing ``datasets`` (packed_cache.py). None when anything must be built."""
    from moetrain.data import DataBundle
    from moetrain.data.corpus import local_source
    from moetrain.data.packed_cache import load_packed, packed_dir, packed_stats
    from moetrain.data.tokenizer import is_trained, load_or_train_tokenizer, tokenizer_fingerprint

    start = time.perf_counter()
    local = local_source(cfg.name, cfg.data_dir, verbose=verbose)
    if local is None or not is_trained(cfg, local[1]):
        return None
    tokenizer = load_or_train_tokenizer(cfg, corpus_key=local[1], verbose=verbose)
    packed = load_packed(packed_dir(cfg, local[1], tokenizer_fingerprint(tokenizer)))
    if packed is None:
        return None
    stats = packed_stats(packed)
    stats.update(
        source=local[1],
        tokenize_cached=True,
        tokenize_seconds=round(time.perf_counter() - start, 3),
        vocab_size=len(tokenizer),
    )
    return DataBundle(tokenizer, packed["train"], packed["validation"], packed["train"].domains, stats)


def build_text(cfg: DataConfig, verbose: bool) -> DataBundle:
    warm = _packed_local(cfg, verbose)
    if warm is not None:
        return warm
    from moetrain.data import DataBundle
    from moetrain.data.datasets import load_documents, tokenize_and_pack
    from moetrain.data.tokenizer import load_or_train_tokenizer, tokenizer_fingerprint

    start = time.perf_counter()
    docs = load_documents(cfg, verbose=verbose)
    load_seconds = time.perf_counter() - start
    t0 = time.perf_counter()
    texts = (t for batch in docs.train.iter(batch_size=1000) for t in batch[docs.text_field])
    tokenizer = load_or_train_tokenizer(cfg, texts, corpus_key=docs.key, verbose=verbose)
    tokenizer_seconds = time.perf_counter() - t0
    packed, stats = tokenize_and_pack(docs, tokenizer, cfg, tokenizer_fingerprint(tokenizer))
    stats.update(
        source=docs.key,
        load_seconds=round(load_seconds, 3),
        tokenizer_seconds=round(tokenizer_seconds, 3),
        vocab_size=len(tokenizer),
    )
    return DataBundle(tokenizer, packed["train"], packed["validation"], docs.domains, stats)


def build_tokens(cfg: DataConfig, verbose: bool) -> DataBundle:
    from moetrain.data import DataBundle
    from moetrain.data.tokenizer import load_or_train_tokenizer
    from moetrain.data.tokens import token_datasets

    tokenizer = load_or_train_tokenizer(_tokens_tokenizer_cfg(cfg), verbose=verbose)
    train, val, stats = token_datasets(
        cfg.data_files, cfg.token_dtype, cfg.seq_len, cfg.validation_fraction, len(tokenizer)
    )
    stats["blocks"] = {"train": len(train), "validation": len(val)}
    stats["vocab_size"] = len(tokenizer)
    return DataBundle(tokenizer, train, val, [cfg.domain or "tokens"], stats)


def _mixture_tokenizer(
    cfg: DataConfig, sources: list[DataConfig], text_docs: dict[int, Any], verbose: bool
) -> PreTrainedTokenizerFast:
    """data.tokenizer; else the tokenizer beside a token source; else a BPE trained on the text sources."""
    from moetrain.data.tokenizer import load_or_train_tokenizer
    from moetrain.data.tokens import tokenizer_beside

    if cfg.tokenizer is None:
        beside = next((tokenizer_beside(s.data_files) for s in sources if s.name == "tokens"), None)
        if beside is not None:
            cfg = replace(cfg, tokenizer=beside)
        elif any(s.name == "tokens" for s in sources):
            raise DataError(
                "data.sources has token files but no tokenizer: set data.tokenizer to the tokenizer that "
                "wrote them (every source shares it)"
            )
    if cfg.tokenizer is not None:
        return load_or_train_tokenizer(cfg, verbose=verbose)
    parts = [[text_docs[i].key, s.select_domain] for i, s in enumerate(sources)]
    key = "mix-" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
    texts = itertools.chain.from_iterable(
        (t for batch in d.train.iter(batch_size=1000) for t in batch[d.text_field]) for d in text_docs.values()
    )
    return load_or_train_tokenizer(cfg, texts, corpus_key=key, verbose=verbose)


def build_mixture(cfg: DataConfig, verbose: bool) -> DataBundle:
    from moetrain.data import DataBundle
    from moetrain.data.datasets import load_documents, tokenize_and_pack
    from moetrain.data.mixture import ConcatBlocks
    from moetrain.data.tokenizer import tokenizer_fingerprint
    from moetrain.data.tokens import token_datasets

    sources = cfg.mixture_sources()
    text_docs = {}
    for i, src in enumerate(sources):
        if src.name != "tokens":
            try:
                text_docs[i] = load_documents(src, verbose=verbose)
            except DataError as e:
                raise DataError(f"data.sources[{i}] ({src.domain}): {e}") from e
    tokenizer = _mixture_tokenizer(cfg, sources, text_docs, verbose)
    fingerprint = tokenizer_fingerprint(tokenizer)
    train, validation = [], []
    stats: dict[str, Any] = {"sources": {}}
    for i, src in enumerate(sources):
        try:
            if i in text_docs:
                packed, s_stats = tokenize_and_pack(text_docs[i], tokenizer, src, fingerprint)
                tr, va = packed["train"], packed["validation"]
            else:
                tr, va, s_stats = token_datasets(
                    src.data_files, src.token_dtype, src.seq_len, src.validation_fraction, len(tokenizer), i
                )
        except DataError as e:
            raise DataError(f"data.sources[{i}] ({src.domain}): {e}") from e
        train.append(tr)
        validation.append(va)
        stats["sources"][src.domain] = {
            "weight": src.weight,
            "blocks": {"train": len(tr), "validation": len(va)},
            "tokens": s_stats.get("tokens"),
        }
    domains = [s.domain for s in sources]
    total = sum(s.weight for s in sources)
    stats.update(vocab_size=len(tokenizer), blocks={"train": sum(map(len, train)), "validation": sum(map(len, validation))})
    return DataBundle(
        tokenizer,
        ConcatBlocks(train),
        ConcatBlocks(validation),
        domains,
        stats,
        train_sources=train,
        validation_sources=validation,
        weights=[s.weight / total for s in sources],
    )
