"""Aux-loss-free balancing in real training runs (mixtral_tiny with sigmoid scores, CPU, gloo).

- expert parallelism: ep_size=2 on 2 processes trains like one process with the bias on (same losses,
  gradient norms and weights within the rounding bounds of moetrain.testing; the bias itself equal);
- resume: stopping at step 10 and resuming reproduces the uninterrupted run bit for bit, the bias
  included (it is a buffer in model.safetensors).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetrain.checkpoint import read_model_state
from moetrain.testing import (
    assert_equivalent,
    cached_run,
    check_ok,
    describe,
    metric_by_step,
    run_train,
    tiny,
)

U = 0.01  # large enough to move the bias by whole steps in 20 steps on the tiny model
# DeepSeek-V3's recipe: sigmoid scores, the bias choosing; sigmoid scoring is where batch invariance of
# the router took care (moe/router.py): ep 2 routes half batches, one process the whole.
BIAS = ("model.moe.bias_update_rate=0.01", "model.moe.aux_loss_weight=0", "model.moe.score_function=sigmoid")
EP2 = ("optim.micro_batch_size=2", "parallel.ep_size=2")  # x 2 processes = global batch 4 (as 1 x 4)
KEYS = ("loss", "lm_loss", "aux_loss", "z_loss")


def biases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(".ffn.router.expert_bias")}


def one_process():
    return cached_run(*tiny(*BIAS), name="bias-ep1").check()


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.numerics
def test_ep2_equals_single_process_with_expert_bias():
    one = one_process()
    two = cached_run(*tiny(*BIAS, *EP2), nproc=2, name="bias-ep2").check()
    assert "world 2 (ep 2" in two.proc.stdout
    assert_equivalent(two, one, range(1, 21), keys=KEYS, grad_norm=True, val_steps=[10, 20], weights_step=20)
    b1 = biases(read_model_state(one.step_dir(20)))
    b2 = biases(read_model_state(two.step_dir(20)))
    assert len(b1) == 2 and b1.keys() == b2.keys()
    # The update depends only on the sign of (integer count - mean count) of the global step: equal
    # routing gives the same bias to the last bit. (A top-k near-tie flipped by rounding would move one
    # element by 2u, and would show in the losses above too.) Per-rank (local) counts instead of the
    # global ones, or a rank skipping the update, differ by whole multiples of u.
    for k in b1:
        assert b1[k].equal(b2[k]), f"{k}: {b1[k].tolist()} (1 process) vs {b2[k].tolist()} (ep 2)"
    spread = max(float(b.max() - b.min()) for b in b1.values())
    assert spread >= 2 * U, "the bias must have moved for this comparison to mean anything"
    # Each rank routes its own tokens with its own copy of the [E] bias: a copy that differed on rank 1
    # would route rank 1's half of the batch differently from the one-process run, which the loss,
    # gradient-norm and weight comparison above would report. (ZeRO-0 fp32 checkpoints hold only the
    # layout-free files, so there is no per-rank file to compare directly.)


@pytest.mark.slow
def test_resume_with_expert_bias_is_exact(tmp_path: Path):
    full = one_process()
    src = full.step_dir(10)
    at10 = biases(read_model_state(src))
    # A resume that lost the bias (restarting from zero) would end with a different step-20 bias and
    # routing: the comparison below catches that only because the step-10 bias is not zero.
    assert any(b.abs().max() > 0 for b in at10.values())
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *tiny(*BIAS, f"trainer.resume={src}"))
    check_ok(proc)
    assert f"resumed from {src} at step 10" in proc.stdout, describe(proc)
    for key in (*KEYS, "grad_norm", "lr", "val_loss"):
        a, b = full.by_step(key), metric_by_step(run_dir, key)
        for s in range(11, 21):
            if s in a or s in b:
                assert a.get(s) == b.get(s), f"{key} at step {s}: {a.get(s)!r} vs {b.get(s)!r}"
    ta = read_model_state(full.step_dir(20))
    tb = read_model_state(run_dir / "checkpoints" / "step_00000020")
    assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
    assert any(not ta[k].equal(at10[k]) for k in at10), "the bias kept moving after the resume"
