"""ZeRO-3 with experts and optimizer offload train like one process at ZeRO-0 (to rounding).

- ``parallel.zero_stage=3`` on 2 gloo ranks, at ep 2 (experts partitioned over their expert-data-parallel
  group of one rank, the rest over both) and at ep 1 (everything over both ranks), and ZeRO-3 with
  ``parallel.offload_optimizer=true``: the same losses, gradient norms (clipped steps included) and
  step-10 weights, expert by expert, as the one-process ZeRO-0 reference (moetrain.testing's
  tolerance model); the negative control trains ZeRO-3 at ep 2 with the experts left in DeepSpeed's
  default placement (partitioned over all ranks: different experts averaged) and must be reported;
- checkpoints: a 2-rank ZeRO-3 checkpoint (offloaded or not) resumes in 1 process at ZeRO-0 on the
  reference's curve, and a ZeRO-0 checkpoint resumes at ZeRO-3 on 2 ranks;
- the non-finite guard skips an update at ZeRO-3 and never saves non-finite weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetrain.checkpoint import read_model_state, read_optimizer_state
from moetrain.testing import (
    REPO_ROOT,
    TrainRun,
    assert_equivalent,
    cached_run,
    check_ok,
    describe,
    equivalence_mismatches,
    margins_paused,
    read_metrics,
    reference_run,
    run_train,
    tiny,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

TWO_RANKS = ("optim.micro_batch_size=2",)  # x 2 processes = the reference's global batch 4
ZERO3 = ("parallel.zero_stage=3",)
STOP10 = ("trainer.stop_at=10",)  # the 20-step LR schedule; the step-10 checkpoint is written
KEYS = ("loss", "lm_loss", "aux_loss", "z_loss")
FAULTY_TRAIN = REPO_ROOT / "tests" / "_faulty_train.py"
LAYOUTS = {
    "ep2": ("parallel.ep_size=2",),
    "ep1": ("parallel.ep_size=1",),
    "ep2-offload": ("parallel.ep_size=2", "parallel.offload_optimizer=true"),
}


def zero3_run(layout: str) -> TrainRun:
    return cached_run(*tiny(*TWO_RANKS, *ZERO3, *LAYOUTS[layout], *STOP10), nproc=2, name=f"zero3-{layout}")


@pytest.mark.numerics
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero3_trains_like_one_process(layout: str):
    ref = reference_run().check()
    run = zero3_run(layout).check()
    assert "ZeRO-3" in run.proc.stdout, describe(run.proc)
    assert any(v > 1.0 for s, v in ref.by_step("grad_norm").items() if s <= 10), "clipped steps compared"
    assert_equivalent(run, ref, range(1, 11), keys=KEYS, grad_norm=True, val_steps=[10], weights_step=10)
    opt, want = (read_optimizer_state(r.step_dir(10)) for r in (run, ref))
    assert opt.keys() == want.keys()
    assert float(opt["step/embed.weight"]) == 10


@pytest.mark.numerics
def test_negative_control_zero3_experts_in_the_wrong_group(tmp_path: Path):
    ref = reference_run().check()
    run_dir = tmp_path / "run"
    bug = "zero3-untagged-experts"
    proc = run_train(
        run_dir,
        *tiny(*TWO_RANKS, *ZERO3, *LAYOUTS["ep2"], *STOP10),
        nproc=2,
        env={"MOETRAIN_TEST_BUG": bug},
        script=FAULTY_TRAIN,
    )
    check_ok(proc)
    assert f"injected bug {bug!r}" in proc.stdout, describe(proc)
    with margins_paused():
        bad = equivalence_mismatches(run_dir, ref, range(1, 11), keys=KEYS, grad_norm=True, weights_step=10)
    assert any(m.startswith("loss at step") for m in bad), bad
    assert any("ffn.experts.w1[expert" in m for m in bad), bad


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["ep2", "ep2-offload"])
def test_zero3_checkpoint_resumes_in_one_process_at_zero0(tmp_path: Path, layout: str):
    src = zero3_run(layout).check()
    proc = run_train(tmp_path / "run", *tiny(f"trainer.resume={src.step_dir(10)}"), nproc=1)
    check_ok(proc)
    assert "weights and optimizer state resharded" in proc.stdout, describe(proc)
    assert_equivalent(
        tmp_path / "run", reference_run(), range(11, 21), keys=KEYS, grad_norm=True, weights_step=20
    )


@pytest.mark.numerics
def test_zero0_checkpoint_resumes_at_zero3(tmp_path: Path):
    ref = reference_run().check()
    args = (*TWO_RANKS, *ZERO3, *LAYOUTS["ep1"], f"trainer.resume={ref.step_dir(10)}")
    proc = run_train(tmp_path / "run", *tiny(*args), nproc=2)
    check_ok(proc)
    assert "weights and optimizer state resharded" in proc.stdout, describe(proc)
    assert_equivalent(tmp_path / "run", ref, range(11, 21), keys=KEYS, grad_norm=True, weights_step=20)


def test_zero3_skips_a_nonfinite_step(tmp_path: Path):
    run = tmp_path / "nan"
    args = (*TWO_RANKS, *ZERO3, *LAYOUTS["ep2-offload"], "trainer.max_steps=6", "trainer.checkpoint_every=3")
    proc = run_train(run, *tiny(*args), nproc=2, env={"MOETRAIN_TEST_NAN_AT_STEP": "3"})
    check_ok(proc)
    assert "non-finite loss at step 3: update skipped" in proc.stdout, describe(proc)
    records = {r["step"]: r for r in read_metrics(run)}
    assert records[3]["skipped_step"] == 1 and records[4]["skipped_step"] == 0
    assert all(records[s]["loss"] == records[s]["loss"] for s in range(4, 7))
    for ckpt in (run / "checkpoints").glob("step_*"):
        weights = read_model_state(ckpt)
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt
