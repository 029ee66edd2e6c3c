"""``parallel.grad_reduce_dtype`` and ``parallel.overlap_comm`` train on 2 gloo ranks (their mapping into
the DeepSpeed config: tests/trainer/test_engine.py; their step-time model: tests/test_plan.py).

Each run stops after 5 of the reference's 20 steps (``trainer.stop_at`` keeps its LR schedule) and is
compared with the one-process reference of the same global batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from moetrain.testing import assert_equivalent, check_ok, reference_run, run_train, tiny

pytestmark = pytest.mark.multiprocess

STEPS = range(1, 6)
DP2 = ("optim.micro_batch_size=2", "trainer.stop_at=5", "trainer.checkpoint_every=0", "trainer.eval_every=0")


@pytest.mark.numerics
def test_bf16_gradient_reduction_trains(tmp_path: Path):
    """Data parallel over 2 ranks (ZeRO-0: DeepSpeed's all-reduce casts to communication_data_type):
    the same training as one process, up to bf16's rounding of the summed gradients (8 mantissa
    bits, ~0.4%: Adam turns it into weight changes of that order times the LR)."""
    run = tmp_path / "run"
    check_ok(run_train(run, *tiny(*DP2, "parallel.grad_reduce_dtype=bf16"), nproc=2))
    ref = reference_run().check()
    from moetrain.testing import metric_by_step

    got, want = metric_by_step(run), ref.by_step("loss")
    assert set(STEPS) <= set(got), got
    for s in STEPS:
        assert math.isfinite(got[s]) and abs(got[s] - want[s]) <= 1e-2 * abs(want[s]), (s, got[s], want[s])
    assert got[5] < got[1]  # it trains


@pytest.mark.numerics
def test_overlap_comm_trains_like_one_process(tmp_path: Path):
    """ZeRO-2 with DeepSpeed's overlapped bucket reduction, experts over 2 ranks: the same training as
    one process (the equivalence bounds of the expert-parallel tests)."""
    run = tmp_path / "run"
    overrides = (*DP2, "parallel.ep_size=2", "parallel.zero_stage=2", "parallel.overlap_comm=true")
    check_ok(run_train(run, *tiny(*overrides), nproc=2))
    assert_equivalent(run, reference_run().check(), STEPS, keys=("loss", "lm_loss"), grad_norm=True)
