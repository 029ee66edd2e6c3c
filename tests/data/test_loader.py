"""ResumableLoader / ValidationLoader: determinism, disjoint shards, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moetrain.data import DataError, ResumableLoader, ValidationLoader
from moetrain.data.packing import PackedDataset, pack


def _dataset(n_blocks: int, seq_len: int = 4) -> PackedDataset:
    # Block i holds the values i*(L+1) .. ; its first token identifies it.
    block = seq_len + 1
    return pack(np.arange(n_blocks * block), np.array([n_blocks * block]), np.array([0]), seq_len, ["all"])


def _block_ids(batch: dict[str, torch.Tensor], block: int) -> list[int]:
    return (batch["input_ids"][:, 0] // block).tolist()


def test_batch_shapes_and_shift() -> None:
    batch = next(ResumableLoader(_dataset(20), batch_size=3, seed=0))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 4)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["domain"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert batch["domain"].shape == (3,)


def test_fixture_batches(fixture_bundle) -> None:
    loader = ResumableLoader(fixture_bundle.train, batch_size=4, seed=0)
    batch = next(loader)
    assert batch["input_ids"].shape == (4, 64) and batch["domain"].max() < len(fixture_bundle.domains)
    assert loader.len_per_epoch == len(fixture_bundle.train) // 4


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_are_disjoint_and_cover_the_epoch(drop_last: bool) -> None:
    data, world, bs = _dataset(23), 2, 3
    seen = []
    for rank in range(world):
        loader = ResumableLoader(data, bs, rank=rank, world_size=world, seed=7, drop_last=drop_last)
        ids = [i for _ in range(loader.len_per_epoch) for i in _block_ids(next(loader), 5)]
        assert loader.epoch == 0
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1])  # ranks take the same number of steps
    union = set(seen[0]) | set(seen[1])
    if drop_last:  # 11 blocks per rank -> 3 batches of 3 each
        assert len(union) == 18
    else:  # everything but the one block that cannot be split evenly over the ranks
        assert len(union) == 22
    one_rank = ResumableLoader(data, 1, seed=7)
    full = {i for _ in range(one_rank.len_per_epoch) for i in _block_ids(next(one_rank), 5)}
    assert full == set(range(23)) and union <= full


def test_epochs_reshuffle_and_are_reproducible() -> None:
    a, b = ResumableLoader(_dataset(12), 4, seed=3), ResumableLoader(_dataset(12), 4, seed=3)
    epoch0 = [_block_ids(next(a), 5) for _ in range(3)]
    epoch1 = [_block_ids(next(a), 5) for _ in range(3)]
    assert a.epoch == 1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) == list(range(12))
    assert epoch0 != epoch1
    assert [_block_ids(next(b), 5) for _ in range(3)] == epoch0
    c = ResumableLoader(_dataset(12), 4, seed=4)
    assert [_block_ids(next(c), 5) for _ in range(3)] != epoch0


@pytest.mark.parametrize("stop_at", [0, 2, 5, 7])  # includes the epoch boundary (5 batches per epoch)
def test_resume_yields_the_same_next_batches(stop_at: int) -> None:
    data = _dataset(21)
    reference = ResumableLoader(data, 4, seed=11)
    expected = [next(reference) for _ in range(stop_at + 6)]

    interrupted = ResumableLoader(data, 4, seed=11)
    for _ in range(stop_at):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert set(state) == {"epoch", "position", "seed"} and all(type(v) is int for v in state.values())

    restored = ResumableLoader(data, 4, seed=999)  # the state carries the seed
    restored.load_state_dict(state)
    for want in expected[stop_at:]:
        got = next(restored)
        assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "labels", "domain"))


def test_too_small_for_one_batch_is_a_one_line_error() -> None:
    with pytest.raises(DataError, match="too few for one batch") as e:
        ResumableLoader(_dataset(5), batch_size=3, world_size=2)
    assert "\n" not in str(e.value)


def test_validation_loader_is_fixed_sharded_and_spread() -> None:
    data = _dataset(40)
    loaders = [ValidationLoader(data, batch_size=2, rank=r, world_size=2, num_batches=3) for r in range(2)]
    passes = [[_block_ids(b, 5) for b in loader] for loader in loaders]
    assert [len(p) for p in passes] == [3, 3]
    assert passes[0] == [_block_ids(b, 5) for b in loaders[0]]  # same batches on every pass
    ids = [i for p in passes for b in p for i in b]
    assert len(set(ids)) == 12 and max(ids) >= 30  # spread over the whole set, not the first 12
    everything = ValidationLoader(data, batch_size=8)
    assert len(everything) == 5 and sorted(i for b in everything for i in _block_ids(b, 5)) == list(range(40))
