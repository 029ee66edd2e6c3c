"""Weighted mixtures of sources: ``data.name=mixture`` with ``data.sources``.

Which source each block comes from follows Megatron-Core's blended dataset (``build_blending_indices``):
the ``g``-th block of the global stream comes from the source furthest behind its target,
``argmax_s(w_s * (g + 1) - drawn_s)`` (ties: the first source). Every source's count then stays within
about one block of ``w_s * g`` at every point of the run, so the shares hold from the first steps, not
only on average, and no random numbers are involved. Within a source, blocks come in a fresh
``torch.randperm`` order per epoch of that source, seeded with ``(seed, source, epoch)``; a source read
to its end starts its next epoch (``data.on_exhausted=repeat``) or ends the run (``stop``).

The stream is global: micro-step ``m`` of a run with ``W`` data-parallel ranks and micro-batch ``B``
consumes the blocks ``[m W B, (m + 1) W B)`` of it and rank ``r`` takes every ``W``-th from ``r``, so a
run with 2 ranks of B sees exactly the blocks of a 1-rank run of 2B. The whole state (blocks drawn in
total and per source, the seed) is a few plain ints, identical on every rank: a checkpoint stores it as
JSON and a resume, at any world size, continues with exactly the blocks that would have come next.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from moetrain.data.errors import DataError
from moetrain.data.loader import Batch, BlockDataset, check_sharding, to_batch


def _source_epoch_seed(seed: int, source: int, epoch: int) -> int:
    return (seed * 1_000_003 + source * 7_919 + epoch) % (2**63)


def blend_schedule(weights: np.ndarray, drawn: list[int], start: int, n: int) -> list[int]:
    """The sources of global blocks ``start .. start + n - 1``, given the blocks ``drawn`` from each
    before ``start`` (updated in place)."""
    out = []
    for g in range(start, start + n):
        s = int(np.argmax(weights * (g + 1) - np.asarray(drawn, dtype=np.float64)))
        drawn[s] += 1
        out.append(s)
    return out


class MixtureLoader:
    """An infinite iterator of training batches mixed from ``sources`` by ``weights`` (normalised).

    Batches are those of :class:`~moetrain.data.loader.ResumableLoader` (``input_ids``, ``labels``,
    ``domain`` = the source's index, ``document_ids`` with ``eos_id``); every block comes from one source.
    """

    def __init__(
        self,
        sources: Sequence[BlockDataset],
        weights: Sequence[float],
        domains: Sequence[str],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        eos_id: int | None = None,
    ) -> None:
        check_sharding(rank, world_size, batch_size)
        if not (len(sources) == len(weights) == len(domains)) or not sources:
            raise ValueError("sources, weights and domains must be non-empty and of equal length")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise DataError(f"mixture weights must be positive numbers, got {list(weights)}")
        for d, src in zip(domains, sources):
            if len(src) == 0:
                raise DataError(f"mixture source {d!r} has no training blocks; use more data or lower data.seq_len")
        self.sources, self.weights, self.domains = list(sources), w / w.sum(), list(domains)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.eos_id = seed, eos_id
        self.position = 0  # global blocks drawn (all ranks together)
        self.drawn = [0] * len(sources)  # global blocks drawn per source
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}  # source -> (epoch, permutation)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def _block(self, s: int, k: int) -> int:
        """The index within source ``s`` of its ``k``-th drawn block."""
        n = len(self.sources[s])
        epoch, i = divmod(k, n)
        cached = self._perms.get(s)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(_source_epoch_seed(self.seed, s, epoch))
            cached = self._perms[s] = (epoch, torch.randperm(n, generator=generator))
        return int(cached[1][i])

    def __next__(self) -> Batch:
        global_batch = self.batch_size * self.world_size
        before = list(self.drawn)
        picks = blend_schedule(self.weights, self.drawn, self.position, global_batch)
        self.position += global_batch
        mine: list[tuple[int, int]] = []  # (source, block index) of this rank's rows, in order
        for j, s in enumerate(picks):
            if j % self.world_size == self.rank:
                mine.append((s, self._block(s, before[s])))
            before[s] += 1
        rows: list[torch.Tensor | None] = [None] * len(mine)
        domain = torch.empty(len(mine), dtype=torch.long)
        for s in sorted({s for s, _ in mine}):  # one gather per source
            slots = [i for i, (src, _) in enumerate(mine) if src == s]
            blocks, _ = self.sources[s].get_batch(torch.tensor([mine[i][1] for i in slots]))
            for i, row in zip(slots, blocks):
                rows[i] = row.long()
            domain[slots] = s
        return to_batch(torch.stack(rows), domain, self.eos_id)  # type: ignore[arg-type]

    # ---- accounting -------------------------------------------------------------------------------
    def tokens_by_domain(self) -> dict[str, int]:
        """Training tokens (inputs) drawn so far from each source, over all ranks."""
        seq_len = self.sources[0].seq_len  # type: ignore[attr-defined]
        return {d: n * seq_len for d, n in zip(self.domains, self.drawn)}

    def epochs(self) -> dict[str, int]:
        """Completed passes over each source (0 during its first)."""
        return {d: n // len(src) for d, n, src in zip(self.domains, self.drawn, self.sources)}

    def exhausted_within(self, micro_batches: int) -> str | None:
        """The first source that ``micro_batches`` more micro-batches would read past its end, or None."""
        drawn = list(self.drawn)
        blend_schedule(self.weights, drawn, self.position, micro_batches * self.batch_size * self.world_size)
        for d, n, src in zip(self.domains, drawn, self.sources):
            if n > len(src):
                return f"source {d!r}"
        return None

    # ---- checkpoint state (plain ints and strings: JSON) ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "mixture",
            "position": int(self.position),
            "drawn": [int(n) for n in self.drawn],
            "domains": list(self.domains),
            "seed": int(self.seed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mixture" or list(state.get("domains", [])) != self.domains:
            saved = state.get("domains") if state.get("kind") == "mixture" else "a single source"
            raise DataError(
                f"the checkpoint's data state is for {saved}, this run mixes {self.domains}: resume with the "
                "same data.sources (their weights may change), or start a new run"
            )
        self.position = int(state["position"])
        self.drawn = [int(n) for n in state["drawn"]]
        self.seed = int(state["seed"])
        self._perms.clear()


class ConcatBlocks:
    """Several block datasets as one (``domain`` = the dataset's index): a mixture's validation blocks
    for the routing analysis, which groups by domain."""

    def __init__(self, parts: Sequence[BlockDataset]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def seq_len(self) -> int:
        return self.parts[0].seq_len  # type: ignore[attr-defined]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, domains = [], []
        for i in indices.tolist():
            p = int(np.searchsorted(self.offsets, i, side="right")) - 1
            blocks, _ = self.parts[p].get_batch(torch.tensor([i - int(self.offsets[p])]))
            rows.append(blocks[0].long())
            domains.append(p)
        return torch.stack(rows), torch.tensor(domains, dtype=torch.long)
