"""``moetrain.testing.run_distributed``: what the in-process multi-process tests rely on."""

from __future__ import annotations

import time

import pytest

from moetrain.testing import run_distributed

pytestmark = pytest.mark.multiprocess


def _all_reduce_worker(rank: int, world: int, expected: float) -> None:
    import os

    import torch
    import torch.distributed as dist

    assert os.environ["RANK"] == str(rank) and os.environ["WORLD_SIZE"] == str(world)
    dist.init_process_group("gloo")
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    assert t.item() == expected


def _failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one says no")
    time.sleep(30)  # the parent must not wait for this rank


def _hanging_worker(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        time.sleep(60)


def test_ranks_meet_and_succeed():
    run_distributed(_all_reduce_worker, 2, 3.0, timeout=60)


def test_failure_in_a_rank_raises_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(Exception, match="rank one says no") as info:
        run_distributed(_failing_worker, 2, timeout=60)
    assert "_failing_worker" in str(info.value), "the child's traceback is part of the message"
    assert time.monotonic() - start < 25


def test_hang_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish"):
        run_distributed(_hanging_worker, 2, timeout=5)
    assert time.monotonic() - start < 20
