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
import torch

from moetrain.checkpoint import read_model_state, read_optimizer_state
from moetrain.moe.experts import onednn_runs_cpu_gemm
from moetrain.testing import (
    TrainRun,
    assert_close_scaled,
    cached_run,
    check_ok,
    describe,
    metric_by_step,
    reference_run,
    rounding_rel,
    run_train,
    scaled_mismatch,
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
    ta, tb = read_model_state(a), read_model_state(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].equal(tb[k]), f"{k} differs"


def resume_from(run: TrainRun, step: int, run_dir: Path, *overrides: str, nproc: int = 1):
    src = run.step_dir(step)
    assert (src / "model.safetensors.index.json").is_file(), f"{src} missing"
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


# ---- every ZeRO stage and dtype: one layout-free checkpoint -------------------------------------------
# (zero_stage, dtype): ZeRO-1/2 keep fp32 master partitions per data-parallel rank, bf16 keeps fp32
# masters at every stage; a checkpoint stores the masters (model.safetensors, fp32) and the optimizer
# state (optimizer.safetensors) once, layout-free, and no DeepSpeed engine files.
ZERO_DTYPES = [("1", "fp32"), ("2", "bf16"), ("0", "bf16")]


def _zero_run(stage: str, dtype: str, *extra: str, ep: int = 1) -> TrainRun:
    args = ("optim.micro_batch_size=2", f"parallel.zero_stage={stage}", f"parallel.dtype={dtype}")
    args += (f"parallel.ep_size={ep}", *extra)
    return cached_run(*tiny(*args), nproc=2, name=f"zero{stage}-{dtype}-ep{ep}")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(("stage", "dtype"), ZERO_DTYPES)
def test_resume_is_exact_for_every_zero_stage_and_dtype(tmp_path: Path, stage: str, dtype: str):
    full = _zero_run(stage, dtype).check()
    # bf16 on a CPU without bf16 instructions: the banner says it is slow and names the fix
    slow = dtype == "bf16" and not onednn_runs_cpu_gemm(torch.bfloat16)
    assert ("use parallel.dtype=fp32 here" in full.proc.stdout) == slow, describe(full.proc)
    ckpt = full.step_dir(10)
    assert not (ckpt / "engine").exists(), "no second copy of the state in DeepSpeed's engine files"
    opt = read_optimizer_state(ckpt)
    weights = read_model_state(ckpt)
    assert all(t.dtype == torch.float32 for t in weights.values()), "fp32 master weights, also in bf16"
    assert {k.split("/", 1)[0] for k in opt} == {"exp_avg", "exp_avg_sq", "step"}
    state_bytes = sum(t.numel() * 4 for t in weights.values()) * 3  # fp32 masters + two moments
    total = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    assert total <= 1.15 * state_bytes, f"{total} bytes on disk for {state_bytes} bytes of state"
    # DeepSpeed's bf16 ZeRO-0 optimizer (FP16_UnfusedOptimizer) takes one zero-gradient step at build
    assert float(opt["step/embed.weight"]) == (11 if (stage, dtype) == ("0", "bf16") else 10)
    resume_from(
        full,
        10,
        tmp_path / "run",
        "optim.micro_batch_size=2",
        f"parallel.zero_stage={stage}",
        f"parallel.dtype={dtype}",
        nproc=2,
    )
    assert_bitwise_continuation(full.run_dir, tmp_path / "run", range(11, 21))
    assert_same_model_file(full.step_dir(20), tmp_path / "run" / "checkpoints" / "step_00000020")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.numerics
def test_zero1_resume_at_another_ep_size_keeps_adamw_state(tmp_path: Path):
    """ep 2 -> ep 1 on 2 ranks (ZeRO-1 then partitions the experts too): one step after the resume,
    the AdamW moments and weights equal the uninterrupted ep-2 run's within rounding (the layouts sum
    gradients in another order). A reinitialised optimizer would be off by ~90% (exp_avg restarts
    at 0.1 x gradient); the first check below is that negative control."""
    ep2 = ("trainer.checkpoint_every=1", "trainer.keep_last=3", "trainer.stop_at=11")
    src = _zero_run("1", "fp32", *ep2, ep=2).check()
    run_dir = tmp_path / "run"
    args = ("optim.micro_batch_size=2", "parallel.zero_stage=1", "parallel.ep_size=1", "trainer.stop_at=11")
    proc = run_train(run_dir, *tiny(*args, f"trainer.resume={src.step_dir(10)}"), nproc=2)
    check_ok(proc)
    assert "weights and optimizer state resharded" in proc.stdout, describe(proc)
    before = read_optimizer_state(src.step_dir(10))
    want = read_optimizer_state(src.step_dir(11))
    got = read_optimizer_state(run_dir / "checkpoints" / "step_00000011")
    assert want.keys() == got.keys()
    assert float(got["step/embed.weight"]) == 11
    # negative control: a fresh optimizer's first exp_avg is (1 - b1) g = m11 - b1 m10 (b1 = 0.9)
    m10, m11 = before["exp_avg/embed.weight"], want["exp_avg/embed.weight"]
    assert scaled_mismatch(m11 - 0.9 * m10, m11, "control", rel=rounding_rel(2000)) is not None
    for k in want:
        if not k.startswith("step/"):
            assert_close_scaled(got[k], want[k], k, rel=rounding_rel(2000))
    w_want = read_model_state(src.step_dir(11))
    w_got = read_model_state(run_dir / "checkpoints" / "step_00000011")
    for k in w_want:
        assert_close_scaled(w_got[k], w_want[k], k, rel=rounding_rel(2000))


def test_resume_at_the_stop_step_has_nothing_to_do(tmp_path: Path):
    """Resuming a checkpoint of step N with trainer.stop_at=N trains nothing and exits 0, naming the
    checkpoint it resumed from as the run's last (not "the final checkpoint could not be written")."""
    src = reference_run().check().step_dir(10)
    proc = run_train(tmp_path / "run", *tiny("trainer.stop_at=10", f"trainer.resume={src}"))
    check_ok(proc)
    assert (
        "stopped at step 10 of 20 (trainer.stop_at" in proc.stdout and f"checkpoint {src}" in proc.stdout
    ), describe(proc)
