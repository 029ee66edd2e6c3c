"""Batches from packed blocks: deterministic, sharded over data-parallel ranks, exactly resumable.

Epoch ``e`` visits the blocks in ``torch.randperm`` order from a generator seeded with
``(seed, e)``. Rank ``r`` of ``W`` takes ``permutation[r : W * n : W]`` with ``n = len // W``, so ranks
are disjoint, every rank takes the same number of steps, and (up to ``len % W`` blocks per epoch)
their union is the epoch. The whole state is three integers, so a checkpoint stores
``state_dict()`` and a restored loader yields exactly the batches that would have come next.
Blocks live in memory and a batch is one tensor gather, so no worker processes are needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from moetrain.data.errors import DataError

Batch = dict[str, torch.Tensor]


class BlockDataset(Protocol):
    def __len__(self) -> int: ...

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def document_ids(input_ids_BT: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per token, the index of its document within the block (int32 [B, T]): 0 for the (possibly
    partial) first document, +1 after every EOS. An EOS belongs to the document it ends."""
    is_eos = (input_ids_BT == eos_id).to(torch.int32)
    return torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos


def to_batch(blocks_BL: torch.Tensor, domain_B: torch.Tensor, eos_id: int | None = None) -> Batch:
    """Inputs and labels of a block (shifted by one), its domain, and with ``eos_id`` (document
    masking) the ``document_ids`` of the inputs."""
    batch = {"input_ids": blocks_BL[:, :-1], "labels": blocks_BL[:, 1:], "domain": domain_B}
    if eos_id is not None:
        batch["document_ids"] = document_ids(batch["input_ids"], eos_id)
    return batch


def check_sharding(rank: int, world_size: int, batch_size: int) -> None:
    """A loader's rank and micro-batch size, checked before any data is touched."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


class ResumableLoader:
    """An infinite iterator of training batches ``{"input_ids", "labels": LongTensor[B, T], "domain": LongTensor[B]}``."""

    def __init__(
        self,
        dataset: BlockDataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
        eos_id: int | None = None,
    ) -> None:
        check_sharding(rank, world_size, batch_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.eos_id = eos_id  # set: batches carry document_ids (data.document_masking)
        self.epoch = 0
        self.position = 0  # batches already yielded in this epoch
        self._shard: torch.Tensor | None = None  # this rank's indices for self.epoch
        self._shard_epoch = -1
        if self.len_per_epoch == 0:
            raise DataError(
                f"{len(dataset)} blocks are too few for one batch of {batch_size} on each of {world_size} "
                "rank(s); lower optim.micro_batch_size or data.seq_len, or use more data"
            )

    @property
    def shard_size(self) -> int:
        """Blocks per rank per epoch (equal on every rank, so ranks stay in step)."""
        return len(self.dataset) // self.world_size

    @property
    def len_per_epoch(self) -> int:
        """Batches per rank per epoch."""
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def shard_indices(self, epoch: int) -> torch.Tensor:
        """The block indices this rank visits in ``epoch``, in order."""
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        permutation = torch.randperm(len(self.dataset), generator=generator)
        return permutation[self.rank : self.world_size * self.shard_size : self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.position >= self.len_per_epoch:
            self.epoch += 1
            self.position = 0
        if self._shard_epoch != self.epoch:
            self._shard, self._shard_epoch = self.shard_indices(self.epoch), self.epoch
        assert self._shard is not None
        start = self.position * self.batch_size
        indices = self._shard[start : start + self.batch_size]
        self.position += 1
        return to_batch(*self.dataset.get_batch(indices), self.eos_id)

    def exhausted_within(self, micro_batches: int) -> str | None:
        """What would run out (None: nothing) if ``micro_batches`` more were drawn: the first epoch."""
        if self.epoch > 0 or self.position + micro_batches > self.len_per_epoch:
            return "the training data"
        return None

    def epochs(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": int(self.seed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self._shard_epoch = -1


class ValidationLoader:
    """A fixed set of validation batches, identical on every pass (comparable across steps).

    With ``num_batches`` set, the blocks used are spread evenly over the whole validation set (still
    in order), so a few batches cover every domain rather than only the first documents. Rank ``r``
    takes every ``W``-th of them.
    """

    def __init__(
        self,
        dataset: BlockDataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_batches: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        check_sharding(rank, world_size, batch_size)
        self.eos_id = eos_id
        shard_size = len(dataset) // world_size
        if shard_size == 0:
            raise DataError(f"{len(dataset)} validation blocks are too few for {world_size} rank(s)")
        self.dataset = dataset
        self.batch_size = min(batch_size, shard_size)  # a tiny validation set still gives one batch
        available = shard_size // self.batch_size
        self.num_batches = available if num_batches is None else max(1, min(num_batches, available))
        total = self.num_batches * self.batch_size * world_size
        spread = torch.div(torch.arange(total) * len(dataset), total, rounding_mode="floor")
        self.indices = spread[rank::world_size]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        for b in range(self.num_batches):
            indices = self.indices[b * self.batch_size : (b + 1) * self.batch_size]
            yield to_batch(*self.dataset.get_batch(indices), self.eos_id)
