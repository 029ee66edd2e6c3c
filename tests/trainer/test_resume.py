"""Stopping at step N and resuming reproduces an uninterrupted 2N-step run bit for bit.

Exact equality is right here (and only here among the training comparisons): a resume in the same
layout replays the same sequence of operations on the same shapes from the saved state (weights,
optimizer, RNG, data position), so any difference at all is a resume bug. Layout changes (ep 2 <-> 1)
are compared within rounding bounds in tests/distributed/test_expert_parallel.py.

Compared per step: loss, its parts, the gradient norm, the LR and the validation loss, and at the end
the model file itself. One process (stop_at + resume=auto, keep_last=1), gradient accumulation, and
two data-parallel processes (resuming the uninterrupted run's step-N checkpoint in a new run dir).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from moetrain.testing import (
    TrainRun,
    cached_run,
    check_ok,
    describe,
    metric_by_step,
    reference_run,
    run_train,
    tiny,
)

KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens")


def assert_bitwise_continuation(full: Path, resumed: Path, steps: range) -> None:
    for key in (*KEYS, "val_loss"):
        a, b = metric_by_step(full, key), metric_by_step(resumed, key)
        for s in steps:
            if s in a or s in b:
                assert s in a and s in b, f"{key} logged at step {s} in only one run"
                assert a[s] == b[s], f"{key} differs at step {s}: {a[s]!r} (uninterrupted) vs {b[s]!r}"


def assert_same_model_file(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].equal(tb[k]), f"{k} differs"


def resume_from(run: TrainRun, step: int, run_dir: Path, *overrides: str, nproc: int = 1):
    src = run.step_dir(step)
    assert (src / "model.safetensors").is_file(), f"{src} missing"
    proc = run_train(run_dir, *tiny(*overrides, f"trainer.resume={src}"), nproc=nproc)
    check_ok(proc)
    assert f"resumed from {src} at step {step}" in proc.stdout, describe(proc)
    return proc


def test_stop_at_then_resume_auto_single_process(tmp_path: Path):
    ref = reference_run().check()
    run_dir = tmp_path / "run"
    # resume=auto in an empty run dir is a fresh start (what makes it safe to always pass)
    first = run_train(run_dir, *tiny("trainer.stop_at=10", "trainer.keep_last=1", "trainer.resume=auto"))
    check_ok(first)
    assert "no checkpoint in this run dir yet" in first.stdout, describe(first)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000010"
    assert metric_by_step(run_dir, "step") == {s: s for s in range(1, 11)}
    assert not (run_dir / "sample.txt").exists(), "stop_at is not the end of training: no sample"

    second = run_train(run_dir, *tiny("trainer.resume=auto", "trainer.keep_last=1"))
    check_ok(second)
    assert f"resumed from {ckpts / 'step_00000010'} at step 10" in second.stdout, describe(second)
    # metrics.jsonl is appended: 1..10 from the first process, 11..20 from the second
    assert metric_by_step(run_dir, "step") == {s: s for s in range(1, 21)}
    assert_bitwise_continuation(ref.run_dir, run_dir, range(1, 21))
    # keep_last=1: only the newest checkpoint remains
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000020"]
    assert_same_model_file(ref.step_dir(20), ckpts / "step_00000020")


def test_resume_with_grad_accum(tmp_path: Path):
    ga = (
        "optim.micro_batch_size=2",
        "optim.grad_accum=2",
        "trainer.max_steps=10",
        "trainer.checkpoint_every=5",
    )
    full = cached_run(*tiny(*ga), name="grad-accum").check()
    resume_from(full, 5, tmp_path / "run", *ga)
    assert_bitwise_continuation(full.run_dir, tmp_path / "run", range(6, 11))
    assert_same_model_file(full.step_dir(10), tmp_path / "run" / "checkpoints" / "step_00000010")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_data_parallel_two_processes(tmp_path: Path):
    full = cached_run(*tiny("optim.micro_batch_size=2"), nproc=2, name="dp2").check()
    resume_from(full, 10, tmp_path / "run", "optim.micro_batch_size=2", nproc=2)
    assert_bitwise_continuation(full.run_dir, tmp_path / "run", range(11, 21))
    assert_same_model_file(full.step_dir(20), tmp_path / "run" / "checkpoints" / "step_00000020")
