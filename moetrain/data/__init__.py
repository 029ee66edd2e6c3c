"""moetrain's data pipeline: corpus -> tokenizer -> packed blocks -> resumable batches.

    bundle = build_data(cfg.data)
    train = ResumableLoader(bundle.train, batch_size, rank, world_size, seed)
    val = ValidationLoader(bundle.validation, batch_size, rank, world_size, num_batches)

Multi-process runs: every cache entry (corpus, tokenizer, tokenised arrays) is built in a temporary
directory and renamed into place, so concurrent builders are safe. To avoid duplicated work, pass
``barrier`` (e.g. ``torch.distributed.barrier``): the main process builds first, the others wait and
then read the caches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetrain.config import DataConfig
from moetrain.data.errors import DataError
from moetrain.data.loader import ResumableLoader, ValidationLoader
from moetrain.data.packing import PackedDataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "DataBundle",
    "DataError",
    "PackedDataset",
    "ResumableLoader",
    "ValidationLoader",
    "build_data",
]


@dataclass
class DataBundle:
    tokenizer: PreTrainedTokenizerFast
    train: PackedDataset  # dataset[i] -> (LongTensor[seq_len + 1], domain id)
    validation: PackedDataset
    domains: list[str]  # domain id -> name
    stats: dict[str, Any] = field(default_factory=dict)


def build_data(
    cfg: DataConfig, *, main_process: bool = True, barrier: Callable[[], None] | None = None
) -> DataBundle:
    """Load (building and caching on first use) the tokenizer and packed train/validation blocks.

    ``main_process`` prints progress; with ``barrier`` the other processes wait until it is done.
    """
    # Imported here so that `import moetrain.data` stays cheap (no datasets/transformers).
    from moetrain.data.datasets import load_documents, tokenize_and_pack
    from moetrain.data.tokenizer import load_or_train_tokenizer, tokenizer_fingerprint

    cfg.validate()
    if barrier is not None and not main_process:
        barrier()  # wait for the main process to fill the caches
    start = time.perf_counter()
    docs = load_documents(cfg, verbose=main_process)
    load_seconds = time.perf_counter() - start
    t0 = time.perf_counter()
    texts = (t for batch in docs.train.iter(batch_size=1000) for t in batch[docs.text_field])
    tokenizer = load_or_train_tokenizer(cfg, texts, corpus_key=docs.key, verbose=main_process)
    tokenizer_seconds = time.perf_counter() - t0
    packed, stats = tokenize_and_pack(docs, tokenizer, cfg, tokenizer_fingerprint(tokenizer))
    if barrier is not None and main_process:
        barrier()
    stats.update(
        source=docs.key,
        load_seconds=round(load_seconds, 3),
        tokenizer_seconds=round(tokenizer_seconds, 3),
        total_seconds=round(time.perf_counter() - start, 3),
        vocab_size=len(tokenizer),
    )
    return DataBundle(tokenizer, packed["train"], packed["validation"], docs.domains, stats)
