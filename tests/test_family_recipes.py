"""The small from-scratch family recipes (``+experiment=gpt_oss_small``, ``deepseek_v3_small``), shrunk
to seconds on the fixture corpus with every architecture option of the recipe kept: ep_size=2 on 2
processes trains like one process holding every expert (within the bounds of
moetrain.testing.equivalence_mismatches), and resuming its step-10 checkpoint reproduces the
uninterrupted run bit for bit. The 300-step runs on the builtin corpus:
benchmarks/results/family_recipes_epyc_2026-12-05.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from moetrain.testing import (
    FAST_OVERRIDES,
    TrainRun,
    assert_equivalent,
    cached_run,
    check_ok,
    describe,
    equivalence_mismatches,
    merge_overrides,
    metric_by_step,
    run_train,
)

STEPS = 20
# mixtral_tiny's schedule and fixture corpus; global_batch aux scope so 2 ranks equal 1 process.
SMALL = (
    "data=fixture",
    *FAST_OVERRIDES,
    "model.moe.aux_loss_scope=global_batch",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.max_seq_len=64",
    "optim.micro_batch_size=4",
    "optim.warmup_steps=2",
    f"trainer.max_steps={STEPS}",
    "trainer.log_every=1",
    "trainer.eval_every=10",
    "trainer.eval_batches=2",
    "trainer.checkpoint_every=10",
)
RECIPES = {
    # sinks, sliding (16) / full layers, biases everywhere, clamped SwiGLU: all kept
    "gpt_oss_small": (
        "model.num_kv_heads=2",
        "model.ffn_hidden_size=64",
        "model.num_experts=4",
        "model.sliding_window=16",
        "model.layer_types=[sliding_attention,full_attention]",
    ),
    # MLA, a dense first layer, a shared expert, 8 experts in 4 groups (best 2), sigmoid + selection bias
    "deepseek_v3_small": (
        "model.num_kv_heads=4",
        "model.ffn_hidden_size=32",
        "model.dense_ffn_hidden_size=128",
        "model.shared_expert_intermediate_size=32",
        "model.num_experts=8",
        "model.top_k=2",
        "model.mla.kv_lora_rank=16",
        "model.mla.q_lora_rank=24",
        "model.mla.qk_rope_head_dim=8",
        "model.mla.qk_nope_head_dim=8",
        "model.mla.v_head_dim=16",
    ),
}
EP2 = ("optim.micro_batch_size=2", "parallel.ep_size=2")  # x 2 processes = global batch 4
KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens")


def recipe(name: str, *extra: str) -> list[str]:
    return merge_overrides((f"+experiment={name}",), SMALL, RECIPES[name], extra)


def ep1(name: str) -> TrainRun:
    return cached_run(*recipe(name), name=f"{name}-1").check()


@pytest.mark.multiprocess
@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_the_same_at_ep2(name: str) -> None:
    one = ep1(name)
    two = cached_run(*recipe(name, *EP2), nproc=2, name=f"{name}-2").check()
    assert "world 2 (ep 2" in two.proc.stdout, describe(two.proc)
    assert_equivalent(
        two,
        one,
        range(1, STEPS + 1),
        keys=("loss", "lm_loss"),
        grad_norm=True,
        val_steps=[10, 20],
        weights_step=STEPS,
    )


def test_the_recipes_train_different_models() -> None:
    """Negative control for the comparison above: the two recipes' tiny runs are not "the same"."""
    assert equivalence_mismatches(ep1("gpt_oss_small"), ep1("deepseek_v3_small"), range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_resumes_exactly(name: str, tmp_path: Path) -> None:
    """Resumed from the uninterrupted run's step-10 checkpoint (the stop_at / resume=auto path itself:
    tests/trainer/test_resume.py), steps 11-20 are those of the uninterrupted run, bit for bit."""
    full = ep1(name)
    run_dir = tmp_path / "run"
    src = full.step_dir(10)
    second = check_ok(run_train(run_dir, *recipe(name, f"trainer.resume={src}")))
    assert f"resumed from {src} at step 10" in second.stdout, describe(second)
    assert metric_by_step(run_dir, "step") == {s: s for s in range(11, STEPS + 1)}
    for key in (*KEYS, "val_loss"):
        a, b = metric_by_step(full.run_dir, key), metric_by_step(run_dir, key)
        a = {s: v for s, v in a.items() if s > 10}
        assert a and a.keys() == b.keys(), key
        assert all(a[s] == b[s] for s in a), f"{key}: {a} (uninterrupted) vs {b} (resumed)"
