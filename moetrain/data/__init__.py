"""moetrain's data pipeline: corpus -> tokenizer -> packed blocks -> resumable batches.

    bundle = build_data(cfg.data)
    train, validation = build_loaders(bundle, cfg.data, batch_size, rank=rank, world_size=world_size)

``train`` is a ResumableLoader (one source, token files) or a MixtureLoader (data.name=mixture);
``validation`` maps each mixture source's domain (or ``""``) to a ValidationLoader.

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
from moetrain.data.loader import BlockDataset, ResumableLoader, ValidationLoader
from moetrain.data.mixture import MixtureLoader
from moetrain.data.packing import PackedDataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "DataBundle",
    "DataError",
    "MixtureLoader",
    "PackedDataset",
    "ResumableLoader",
    "ValidationLoader",
    "build_data",
    "build_loaders",
]


@dataclass
class DataBundle:
    tokenizer: PreTrainedTokenizerFast
    train: BlockDataset  # get_batch(indices) -> (LongTensor[B, seq_len + 1], domain ids [B])
    validation: BlockDataset
    domains: list[str]  # domain id -> name
    stats: dict[str, Any] = field(default_factory=dict)
    # data.name=mixture: each source's blocks (domain i = source i) and its normalised weight
    train_sources: list[BlockDataset] | None = None
    validation_sources: list[BlockDataset] | None = None
    weights: list[float] | None = None

    @property
    def is_mixture(self) -> bool:
        return self.weights is not None


def build_data(
    cfg: DataConfig, *, main_process: bool = True, barrier: Callable[[], None] | None = None
) -> DataBundle:
    """Load (building and caching on first use) the tokenizer and the train/validation blocks.

    ``main_process`` prints progress; with ``barrier`` the other processes wait until it is done.
    """
    # Imported here so that `import moetrain.data` stays cheap (no datasets/transformers).
    from moetrain.data.sources import build_mixture, build_text, build_tokens

    cfg.validate()
    if barrier is not None and not main_process:
        barrier()  # wait for the main process to fill the caches
    start = time.perf_counter()
    build = {"mixture": build_mixture, "tokens": build_tokens}.get(cfg.name, build_text)
    bundle = build(cfg, main_process)
    if barrier is not None and main_process:
        barrier()
    bundle.stats["total_seconds"] = round(time.perf_counter() - start, 3)
    return bundle


def build_loaders(
    bundle: DataBundle,
    cfg: DataConfig,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    eval_batches: int | None = None,
) -> tuple[ResumableLoader | MixtureLoader, dict[str, ValidationLoader]]:
    """The training loader and the validation loaders: one per source of a mixture (by domain), else
    one under the key ``""``. With ``cfg.document_masking`` batches carry ``document_ids``."""
    eos_id = bundle.tokenizer.eos_token_id if cfg.document_masking else None
    if bundle.is_mixture:
        assert bundle.train_sources is not None and bundle.validation_sources is not None
        train: ResumableLoader | MixtureLoader = MixtureLoader(
            bundle.train_sources, bundle.weights, bundle.domains, batch_size, rank, world_size, seed, eos_id
        )
        validation = {
            domain: ValidationLoader(v, batch_size, rank, world_size, eval_batches, eos_id=eos_id)
            for domain, v in zip(bundle.domains, bundle.validation_sources)
        }
        return train, validation
    train = ResumableLoader(bundle.train, batch_size, rank, world_size, seed, eos_id=eos_id)
    return train, {"": ValidationLoader(bundle.validation, batch_size, rank, world_size, eval_batches, eos_id=eos_id)}
