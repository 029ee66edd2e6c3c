"""Data parallelism: 2 processes x micro-batch 2 train exactly like 1 process x micro-batch 4.

With ``model.moe.aux_loss_scope=global_batch`` the balance loss sees the global batch's routing, so the
whole loss is linear in the per-rank terms and the runs agree to float rounding.
"""

from __future__ import annotations

import pytest

from moetrain.testing import cached_run, max_abs_diff, reference_run, tiny

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_two_processes_equal_one_process_same_global_batch():
    one = reference_run().check()
    two = cached_run(*tiny("optim.micro_batch_size=2"), nproc=2, name="dp2").check()
    assert "world 2 (ep 1" in two.proc.stdout
    steps = range(1, 21)
    for key in ("loss", "lm_loss", "aux_loss", "z_loss"):
        diff = max_abs_diff(one.by_step(key), two.by_step(key), steps)
        assert diff < 1e-5, f"{key}: 2 processes differ from 1 process by {diff:.2e}"
    assert one.by_step("tokens") == two.by_step("tokens"), "token counts are global"
    assert max_abs_diff(one.by_step("val_loss"), two.by_step("val_loss"), [10]) < 1e-5
    # only rank 0 writes metrics: one record per step
    assert [r["step"] for r in two.metrics()] == list(range(1, 21))
