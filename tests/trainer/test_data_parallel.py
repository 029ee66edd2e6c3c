"""Data parallelism: 2 processes x micro-batch 2 train like 1 process x micro-batch 4.

With ``model.moe.aux_loss_scope=global_batch`` the balance loss sees the global batch's routing, so the
whole loss is linear in the per-rank terms and the runs agree to float rounding: the same losses,
gradient norms and weights within the bounds of ``moetrain.testing.equivalence_mismatches`` (set
between rounding and real bugs; its negative controls are in tests/distributed/test_expert_parallel.py).
"""

from __future__ import annotations

import pytest

from moetrain.testing import assert_equivalent, cached_run, reference_run, tiny

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.mark.numerics
def test_two_processes_equal_one_process_same_global_batch():
    one = reference_run().check()
    two = cached_run(*tiny("optim.micro_batch_size=2"), nproc=2, name="dp2").check()
    assert "world 2 (ep 1" in two.proc.stdout
    assert_equivalent(
        two,
        one,
        range(1, 21),
        keys=("loss", "lm_loss", "aux_loss", "z_loss"),
        grad_norm=True,
        val_steps=[10, 20],
        weights_step=20,
    )
    assert one.by_step("tokens") == two.by_step("tokens"), "token counts are global"
    # only rank 0 writes metrics: one record per step
    assert [r["step"] for r in two.metrics()] == list(range(1, 21))
