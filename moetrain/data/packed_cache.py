"""Packed blocks cached on disk and memory-mapped, so that no rank holds the corpus in its heap.

The first run packs a text source (datasets.py, packing.py) and writes its blocks here: per split,
``{split}_blocks.npy`` (int32 [N, seq_len + 1]) and ``{split}_domains.npy`` (int64 [N]), and a
``meta.json`` (domains, document and token counts) written last, all in one atomic rename. Every run,
the first one included, then opens the arrays with ``np.load(mmap_mode="c")``: a rank's resident
memory holds only the pages its batches touch, and the ranks of a node share one copy in the page
cache (as Megatron's and OLMo-core's memory-mapped datasets do) instead of each packing the whole
corpus into its own memory; a 10-billion-token corpus would otherwise be 40 GB in every rank.

For the builtin corpus and the fixture, whose identity is a hash of their files, a warm start reads
this cache without importing ``datasets`` (``sources.build_text``): with pandas and pyarrow, which
come with it, and the packed blocks, that was 142 MiB of each process's resident memory (docs/DATA.md).

The key is everything the blocks depend on: the source's content key, the tokenizer's fingerprint,
the ``data.*`` fields that select and split documents, and ``seq_len``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrain.config import DataConfig
from moetrain.data.cache import TOKENIZED_VERSION, atomic_dir, resolve_data_dir
from moetrain.data.corpus import SPLITS
from moetrain.data.packing import PackedDataset

PACKED_VERSION = 1  # bump when packing or this layout changes
META_FILE = "meta.json"


def packed_dir(cfg: DataConfig, source_key: str, tokenizer_fp: str) -> Path:
    """Where ``cfg``'s packed blocks of the source ``source_key`` live."""
    parts = [
        PACKED_VERSION,
        TOKENIZED_VERSION,
        source_key,
        tokenizer_fp,
        cfg.split,
        cfg.validation_split,
        cfg.validation_fraction,
        cfg.text_field,
        cfg.domain_field,
        cfg.text_split if cfg.name == "text" else None,
        cfg.select_domain,
        cfg.max_documents,
        cfg.seq_len,
    ]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    return resolve_data_dir(cfg.data_dir) / "packed" / key


def save_packed(path: Path, packed: dict[str, PackedDataset], domains: list[str]) -> None:
    """Write ``packed`` (both splits) to ``path`` atomically (a concurrent writer's entry wins)."""
    with atomic_dir(path) as tmp:
        meta: dict[str, Any] = {"version": PACKED_VERSION, "domains": domains, "splits": {}}
        for split in SPLITS:
            p = packed[split]
            np.save(tmp / f"{split}_blocks.npy", p.blocks_NL.numpy())
            np.save(tmp / f"{split}_domains.npy", p.domain_N.numpy())
            meta["splits"][split] = {
                "num_tokens": p.num_tokens,
                "num_documents": p.num_documents,
                "tokens_per_domain": p.tokens_per_domain,
            }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")  # last: marks it complete


def load_packed(path: Path) -> dict[str, PackedDataset] | None:
    """The memory-mapped splits at ``path``, or None when nothing is cached."""
    if not (path / META_FILE).is_file():
        return None
    meta = json.loads((path / META_FILE).read_text())
    packed = {}
    for split in SPLITS:
        counts = meta["splits"][split]
        packed[split] = PackedDataset(
            # "c": copy-on-write, so the tensor is writable (torch warns on read-only arrays); nothing
            # writes to it, so every page stays the shared page-cache copy.
            blocks_NL=torch.from_numpy(np.load(path / f"{split}_blocks.npy", mmap_mode="c")),
            domain_N=torch.from_numpy(np.load(path / f"{split}_domains.npy", mmap_mode="c")),
            domains=meta["domains"],
            num_tokens=counts["num_tokens"],
            num_documents=counts["num_documents"],
            tokens_per_domain=counts["tokens_per_domain"],
        )
    return packed


def packed_stats(packed: dict[str, PackedDataset]) -> dict[str, Any]:
    """Documents, tokens, blocks and tokens per domain of each split (the data banner's figures)."""
    return {
        "documents": {s: p.num_documents for s, p in packed.items()},
        "tokens": {s: p.num_tokens for s, p in packed.items()},
        "blocks": {s: len(p) for s, p in packed.items()},
        "tokens_per_domain": {s: p.tokens_per_domain for s, p in packed.items()},
    }


__all__ = ["load_packed", "packed_dir", "packed_stats", "save_packed"]
