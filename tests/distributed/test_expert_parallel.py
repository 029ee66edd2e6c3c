"""Expert parallelism (``parallel.ep_size``) trains like one process holding every expert (to rounding).

- end to end: ep_size=2 on 2 processes vs ep_size=1 on 1 process (same seed, same global batch):
  the same losses, gradient norms and final weights (expert by expert) for 20 steps, with and without
  the router losses (global_batch scope), and with ZeRO-2; "the same" within bounds set between
  rounding and real bugs (moetrain.testing.equivalence_mismatches), with negative controls that
  train with such a bug (tests/_faulty_train.py) and assert that the comparison reports it;
- in-process: expert gradients after DeepSpeed's reduction equal the single-process gradients (the
  check that catches experts averaged across ranks that hold *different* experts; the wrong-group
  average and a 1/ep scaling are checked to fail it);
- in-process: routing so uneven that ranks send nothing to some rank and experts receive nothing;
- checkpoints: ep 2 -> ep 2 bit for bit; ep 2 -> ep 1 and ep 1 -> ep 2 through the layout-free
  model file and optimizer state;
- the two-"node" localhost launch (scripts/two_node_localhost.sh).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from moetrain.checkpoint import read_model_state, read_optimizer_state
from moetrain.testing import (
    REPO_ROOT,
    TrainRun,
    assert_close_scaled,
    assert_equivalent,
    cached_run,
    check_ok,
    describe,
    ep_train_config,
    equivalence_mismatches,
    margins_paused,
    metric_by_step,
    offline_env,
    reference_run,
    rounding_rel,
    run_command,
    run_distributed,
    run_train,
    scaled_mismatch,
    tiny,
)

pytestmark = pytest.mark.multiprocess

EP2 = ("optim.micro_batch_size=2", "parallel.ep_size=2")  # x 2 processes = global batch 4
NO_AUX = ("model.moe.aux_loss_weight=0", "model.moe.z_loss_weight=0")
ROUTER_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss")
FAULTY_TRAIN = REPO_ROOT / "tests" / "_faulty_train.py"


def ep1_run(aux: bool) -> TrainRun:
    if aux:
        return reference_run().check()
    return cached_run(*tiny(*NO_AUX), name="ep1-noaux").check()


def ep2_run(aux: bool) -> TrainRun:
    return cached_run(*tiny(*EP2, *(() if aux else NO_AUX)), nproc=2, name="ep2").check()


# ---- (a) end to end equivalence ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("aux", [False, True], ids=["no-router-losses", "global-batch-aux"])
def test_ep2_equals_single_process(aux: bool):
    one, two = ep1_run(aux), ep2_run(aux)
    assert "world 2 (ep 2" in two.proc.stdout
    keys = ROUTER_KEYS if aux else ("loss", "lm_loss")
    assert_equivalent(two, one, range(1, 21), keys=keys, grad_norm=True, val_steps=[10, 20], weights_step=20)
    if not aux:  # no router losses: the logged loss is the LM loss itself, bit for bit
        assert all(two.by_step("loss")[s] == two.by_step("lm_loss")[s] for s in range(1, 21))


@pytest.mark.slow
@pytest.mark.numerics
def test_ep2_zero2_equals_single_process():
    """ZeRO-2 partitions expert gradients over the expert-data-parallel group and clips with its own
    norm: under EP it must still match one process (ZeRO-0), clipped steps included (grad norm > 1)."""
    one = ep1_run(aux=True)
    two = cached_run(*tiny(*EP2, "parallel.zero_stage=2"), nproc=2, name="ep2-zero2").check()
    assert "ZeRO-2" in two.proc.stdout
    norms = one.by_step("grad_norm")
    assert any(v > 1.0 for v in norms.values()), "the comparison must include clipped steps"
    assert_equivalent(two, one, range(1, 21), keys=ROUTER_KEYS, grad_norm=True, weights_step=20)


# Negative controls: the same comparison, run on an ep 2 training with a deliberate bug
# (tests/_faulty_train.py), must report it. 10 steps (stop_at keeps the 20-step LR schedule and
# writes the step-10 checkpoint), compared with the reference's first 10.
@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("bug", ["wrong-expert-group", "expert-grad-over-ep"])
def test_negative_control_equivalence_check_catches_ep_bug(tmp_path: Path, bug: str):
    ref = reference_run().check()
    run_dir = tmp_path / "run"
    proc = run_train(
        run_dir,
        *tiny(*EP2, "trainer.stop_at=10"),
        nproc=2,
        env={"MOETRAIN_TEST_BUG": bug},
        script=FAULTY_TRAIN,
    )
    check_ok(proc)
    assert f"injected bug {bug!r}" in proc.stdout, describe(proc)
    with margins_paused():
        bad = equivalence_mismatches(
            run_dir, ref, range(1, 11), keys=ROUTER_KEYS, grad_norm=True, val_steps=[10], weights_step=10
        )
    assert bad, f"the equivalence check did not notice the bug {bug!r}"
    if bug == "wrong-expert-group":
        # every expert of every layer trained on another expert's gradient: each one is reported
        for layer in (0, 1):
            for e in range(4):
                assert any(f"layers.{layer}.ffn.experts.w1[expert {e}]" in m for m in bad), bad
        assert any(m.startswith("loss at step") for m in bad), bad
    else:
        # Adam is nearly invariant to a gradient's scale: the weights barely notice, the norm does
        assert any(m.startswith("grad_norm at step 1:") for m in bad), bad


# ---- (c) checkpoints across layouts ---------------------------------------------------------------
@pytest.mark.slow
def test_resume_ep2_from_ep2_is_exact(tmp_path: Path):
    """A resume in the same layout replays the same operations on the same shapes: bit for bit."""
    src = ep2_run(aux=True)
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *tiny(*EP2, f"trainer.resume={src.step_dir(10)}"), nproc=2)
    check_ok(proc)
    assert "resumed from" in proc.stdout and "resharded" not in proc.stdout, describe(proc)
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "val_loss"):
        a, b = src.by_step(key), metric_by_step(run_dir, key)
        for s in range(11, 21):
            if s in a:
                assert a[s] == b[s], f"{key} at step {s}: {a[s]!r} vs {b[s]!r}"
    ta = read_model_state(src.step_dir(20))
    tb = read_model_state(run_dir / "checkpoints" / "step_00000020")
    assert all(ta[k].equal(tb[k]) for k in ta)


@pytest.mark.slow
@pytest.mark.numerics
def test_resume_ep2_checkpoint_with_ep1(tmp_path: Path):
    src = ep2_run(aux=True)
    folder = src.step_dir(10)
    assert (folder / "optimizer.safetensors.index.json").is_file(), (
        "the layout-free optimizer state is saved under EP"
    )
    full_opt = read_optimizer_state(folder)
    w1 = full_opt["exp_avg/layers.0.ffn.experts.w1"]
    assert w1.shape[0] == 4, "optimizer state holds all experts in global order"
    proc = run_train(tmp_path / "run", *tiny(f"trainer.resume={folder}"), nproc=1)
    check_ok(proc)
    assert "weights and optimizer state resharded" in proc.stdout, describe(proc)
    # step 11's loss depends on the loaded weights only; later steps on the optimizer state too
    assert_equivalent(tmp_path / "run", reference_run(), [11])
    assert_equivalent(tmp_path / "run", reference_run(), range(11, 21), grad_norm=True, weights_step=20)


@pytest.mark.slow
@pytest.mark.numerics
def test_resume_ep1_checkpoint_with_ep2(tmp_path: Path):
    ref = reference_run().check()
    assert (ref.step_dir(10) / "optimizer.safetensors.index.json").is_file()
    proc = run_train(tmp_path / "run", *tiny(*EP2, f"trainer.resume={ref.step_dir(10)}"), nproc=2)
    check_ok(proc)
    assert "weights and optimizer state resharded" in proc.stdout, describe(proc)
    assert_equivalent(tmp_path / "run", ref, [11])
    assert_equivalent(tmp_path / "run", ref, range(11, 21), grad_norm=True, weights_step=20)


# ---- (e) two simulated nodes on localhost ---------------------------------------------------------
@pytest.mark.slow
def test_two_node_localhost_launch(tmp_path: Path):
    run_dir = tmp_path / "run"
    script = REPO_ROOT / "scripts" / "two_node_localhost.sh"
    assert script.is_file()
    args = tiny(*EP2, "trainer.max_steps=3", f"hydra.run.dir={run_dir}")
    env = offline_env({"TIMEOUT_S": "240", "LOG_DIR": str(tmp_path / "logs")}, nproc=2)
    proc = run_command(["bash", str(script), *args], env=env, timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert "both nodes finished" in proc.stdout, describe(proc)
    assert "world 2 (ep 2" in proc.stdout
    latest = run_dir / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step_00000003"
    assert (run_dir / "checkpoints" / "step_00000003" / "model.safetensors.index.json").is_file()
    # the same training as torchrun on one node: step 1 and 2 don't depend on max_steps (another
    # launcher may give the ranks other thread counts, hence other GEMM blocking: not bit for bit)
    assert_equivalent(run_dir, ep2_run(aux=True), [1, 2])


# ---- in-process tests ------------------------------------------------------------------------------
def _train_config(ep_size: int, top_k: int = 2, scope: str = "global_batch"):
    return ep_train_config(ep_size, top_k=top_k, aux_loss_scope=scope)


def _expert_slice(name: str, full: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
    if name.endswith((".experts.w1", ".experts.v1", ".experts.w2")):
        El = full.shape[0] // ep_size
        return full[ep_rank * El : (ep_rank + 1) * El]
    return full


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


# In-process, one forward/backward in fp32: the ranks' half-batches give per-rank partial sums (and
# other GEMM row counts) where one process sums the whole batch at once, so loss and gradients agree
# to rounding: allowed 64 ulps of each tensor's scale (~7.6e-6 relative). The two mistakes checked as
# negative controls (an expert averaged with another rank's expert, a gradient scaled by 1/ep) are
# off by O(1) of the scale.
LOSS_GRAD_REL = rounding_rel(64)


def _expert_grad_worker(rank: int, world: int) -> None:
    import torch.distributed as dist
    from deepspeed.utils import groups

    from moetrain.distributed import init_distributed
    from moetrain.distributed.expert_parallel import parallelize
    from moetrain.model import MoETransformer
    from moetrain.trainer.engine import build_engine

    env = init_distributed()
    cfg = _train_config(ep_size=world)
    torch.manual_seed(0)
    ref = MoETransformer(cfg.model)  # the single-process reference: every expert, the full batch
    init = copy.deepcopy(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.model.vocab_size, (2 * world, 13), generator=gen)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    ref_out = ref(inputs, labels)
    ref_out.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    mine = slice(2 * rank, 2 * rank + 2)

    # 1) our layer + the documented reduction: dense grads averaged over the world; expert grads
    #    summed over the expert-data-parallel group and divided by the world size
    model = MoETransformer(cfg.model)
    model.load_state_dict(init)
    ep = parallelize(model, cfg, env)
    assert ep.enabled and ep.ep_size == world and ep.ep_rank == rank
    out = model(inputs[mine], labels[mine])
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    assert_close_scaled(loss / world, ref_out.loss.detach(), "loss", rel=LOSS_GRAD_REL)
    expert_dp = groups._get_expert_data_parallel_group(ep.group_name)
    n_expert = 0
    for name, p in model.named_parameters():
        g = _grad(p).clone()
        want = _expert_slice(name, ref_grads[name], ep.ep_rank, ep.ep_size)
        if getattr(p, "allreduce", True) is False:
            n_expert += 1
            # negative controls: the same comparison on two classic mistakes must fail
            wrong_group = g.clone()
            dist.all_reduce(wrong_group)  # over every rank: mixes this expert with another rank's
            dist.all_reduce(g, group=expert_dp)
            g /= world
            over_ep = g / ep.ep_size  # MegaBlocks-style 1/ep scaling on top of the correct mean
            with margins_paused():
                assert scaled_mismatch(wrong_group / world, want, name, rel=LOSS_GRAD_REL) is not None, (
                    f"{name}: averaging over the wrong group went unnoticed"
                )
                assert scaled_mismatch(over_ep, want, name, rel=LOSS_GRAD_REL) is not None, (
                    f"{name}: a gradient scaled by 1/ep went unnoticed"
                )
        else:
            dist.all_reduce(g)
            g /= world
        assert_close_scaled(g, want, name, rel=LOSS_GRAD_REL)
    assert n_expert == 3 * len(model.moe_layers)

    # 2) the real DeepSpeed engine (ZeRO-0) reduces the same way
    model = MoETransformer(cfg.model)
    model.load_state_dict(init)
    ep = parallelize(model, cfg, env)
    engine, *_ = build_engine(model, cfg, world)
    assert engine.has_moe_layers, "DeepSpeed must see the sharded layers as MoE layers"
    out = engine(inputs[mine], labels[mine])
    engine.backward(out.loss)
    for name, p in model.named_parameters():
        want = _expert_slice(name, ref_grads[name], ep.ep_rank, ep.ep_size)
        assert_close_scaled(_grad(p), want, f"engine {name}", rel=LOSS_GRAD_REL)
    # and the experts really are different per rank (otherwise the test could not tell)
    w1 = model.layers[0].ffn.experts.w1.detach()
    others = [torch.empty_like(w1) for _ in range(world)]
    dist.all_gather(others, w1)
    assert not torch.equal(others[0], others[1])


@pytest.mark.numerics
def test_expert_gradients_match_single_process():
    run_distributed(_expert_grad_worker, 2, timeout=180)


# Uneven routing: which experts each rank's tokens choose (top-k order), for 4 experts on 2 ranks
# (rank 0 owns experts 0-1, rank 1 owns 2-3).
ROUTING_CASES = {
    # rank 1 receives nothing; experts 2 and 3 get no token; rank 0 sends nothing to rank 1
    "all-to-rank-0-top1": {0: [0], 1: [1]},
    # no traffic between ranks at all; experts 1 and 2 idle
    "each-rank-to-itself-top1": {0: [0], 1: [3]},
    # top-2, everything on rank 0's experts
    "all-to-rank-0-top2": {0: [0, 1], 1: [1, 0]},
    # one rank sends everything away, the other keeps everything
    "one-way-top2": {0: [2, 3], 1: [3, 2]},
}


def _uneven_worker(rank: int, world: int) -> None:
    from moetrain.distributed import init_distributed
    from moetrain.distributed.expert_parallel import parallelize
    from moetrain.model import MoETransformer

    env = init_distributed()
    H, E, T = 32, 4, 8
    for case, choices in ROUTING_CASES.items():
        top_k = len(choices[0])
        cfg = _train_config(ep_size=world, top_k=top_k, scope="micro_batch")
        torch.manual_seed(0)
        ref = MoETransformer(cfg.model)
        with torch.no_grad():  # logits = 10 * x[:, :E]
            gate = ref.moe_layers[0].router.gate.weight
            gate.zero_()
            gate[:, :E] = 10 * torch.eye(E)
        model = copy.deepcopy(ref)
        parallelize(model, cfg, env)
        layer, ref_layer = model.moe_layers[0], ref.moe_layers[0]

        gen = torch.Generator().manual_seed(2)
        x_all = torch.randn(world, T, H, generator=gen)
        x_all[:, :, :E] = -5.0
        for r, experts in choices.items():
            for j, e in enumerate(experts):
                x_all[r, :, e] = 5.0 - j  # first choice logit 50, second 40, the rest -50
        proj = torch.randn(H, generator=gen)

        x_ref = x_all.clone().requires_grad_()
        y_ref, stats_ref = ref_layer(x_ref)
        (y_ref * proj).sum().backward()

        x = x_all[rank : rank + 1].clone().requires_grad_()
        y, stats = layer(x)
        (y * proj).sum().backward()

        want_counts = torch.zeros(E)
        want_counts[choices[rank]] = T
        assert torch.equal(stats.tokens_per_expert_E, want_counts), (case, stats.tokens_per_expert_E)
        # the same tokens through the same experts, batched differently (rows arrive by source rank):
        # rounding only (see LOSS_GRAD_REL). An expert that receives no token must get an exactly zero
        # gradient, which the scaled comparison enforces (scale 0 -> bound 0).
        assert_close_scaled(y, y_ref[rank : rank + 1], f"{case}: output", rel=LOSS_GRAD_REL)
        assert_close_scaled(x.grad, x_ref.grad[rank : rank + 1], f"{case}: input grad", rel=LOSS_GRAD_REL)
        # loss is a sum over all tokens of both ranks: expert grads need no reduction at all
        El = E // world
        for pname in ("w1", "v1", "w2"):
            got = _grad(getattr(layer.experts, pname))
            want = _grad(getattr(ref_layer.experts, pname))[rank * El : (rank + 1) * El]
            for e in range(El):  # each expert against its own scale: an idle one must be exactly 0
                assert_close_scaled(got[e], want[e], f"{case}: {pname}[{rank * El + e}]", rel=LOSS_GRAD_REL)
        # The routing here is saturated (logits 50 / 40 / -50), so the gate's gradient is mostly
        # rounding residue (~e^-10 of its terms; with top-1 the renormalised weight is exactly 1): it
        # is held to the scale of the terms it sums, the layer's input gradient, not to its own size.
        # (The gate gradient's reduction itself is checked with real values in
        # test_expert_gradients_match_single_process.)
        gate_grad = _grad(layer.router.gate.weight).clone()
        torch.distributed.all_reduce(gate_grad)
        terms = x_ref.grad.abs().max().item()
        assert_close_scaled(
            gate_grad, _grad(ref_layer.router.gate.weight), f"{case}: gate", rel=LOSS_GRAD_REL, scale=terms
        )


@pytest.mark.numerics
def test_uneven_routing_no_hang_and_exact():
    run_distributed(_uneven_worker, 2, timeout=120)


def _single_process_engine_worker(rank: int, world: int, dtype: str) -> None:
    import copy

    from moetrain.distributed import init_distributed
    from moetrain.model import MoETransformer
    from moetrain.trainer.engine import build_engine

    init_distributed()
    cfg = _train_config(ep_size=1)
    cfg.parallel.dtype = dtype
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    twin = copy.deepcopy(model)
    engine, *_ = build_engine(model, cfg, world)
    # One process, ZeRO-0: the engine skips DeepSpeed's gradient all-reduce over a group of one...
    assert engine.enable_backward_allreduce is False
    reducing, *_ = build_engine(twin, cfg, world)
    reducing.enable_backward_allreduce = True  # the pass it skips: flatten, fp32 cast, reduce, copy
    ids = torch.randint(0, cfg.model.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    for e in (engine, reducing):
        e.backward(e(ids[:, :-1], ids[:, 1:]).loss)
    # ...which changes no bit of any gradient.
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_single_process_engine_skips_a_reduction_that_changes_nothing(dtype: str):
    run_distributed(_single_process_engine_worker, 1, dtype, timeout=120)


def _groups_of_one_worker(rank: int, world: int, dtype: str) -> None:
    import copy

    from moetrain.distributed import init_distributed
    from moetrain.distributed.expert_parallel import parallelize
    from moetrain.model import MoETransformer
    from moetrain.trainer.engine import build_engine

    env = init_distributed()
    cfg = _train_config(ep_size=world)  # every expert's data-parallel group is one rank
    cfg.parallel.dtype = dtype
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    twin = copy.deepcopy(model)
    parallelize(model, cfg, env)
    parallelize(twin, cfg, env)
    engine, *_ = build_engine(model, cfg, world)
    stock, *_ = build_engine(twin, cfg, world)
    del stock.allreduce_no_retain  # DeepSpeed's own: one flat buffer per 500M elements
    assert "allreduce_no_retain" in vars(engine)
    flat: dict[str, list[int]] = {"engine": [], "stock": []}
    for name, e in (("engine", engine), ("stock", stock)):
        e.flatten = lambda ts, seen=flat[name]: (
            seen.append(sum(t.numel() for t in ts)) or (torch._utils._flatten_dense_tensors(ts))
        )
    ids = torch.randint(0, cfg.model.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1 + rank))
    for e in (engine, stock):
        e.backward(e(ids[:, :-1], ids[:, 1:]).loss)
    # The same bits in every gradient (expert gradients scaled by 1 / world, dense ones all-reduced)...
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
    experts = [p for p in model.parameters() if getattr(p, "allreduce", True) is False]
    assert experts and all(p.grad.abs().sum() > 0 for p in experts)
    # ...without DeepSpeed's buffer of all of a rank's expert gradients: the same elements pass, but
    # no copy is larger than one expert gradient or the dense bucket (reduced over both ranks).
    dense = sum(p.numel() for p in model.parameters() if getattr(p, "allreduce", True) is not False)
    expert_total = sum(p.numel() for p in experts)
    largest = max(dense, *(p.numel() for p in experts))
    assert expert_total > largest  # else the check below could not tell
    assert max(flat["stock"]) == expert_total  # the negative control sees DeepSpeed's buffer
    assert max(flat["engine"]) <= largest and sum(flat["engine"]) == sum(flat["stock"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_expert_gradients_reduced_over_one_rank_without_a_flat_buffer(dtype: str):
    run_distributed(_groups_of_one_worker, 2, dtype, timeout=180)


def _lean_bf16_step_worker(rank: int, world: int) -> None:
    import copy

    from moetrain.distributed import init_distributed
    from moetrain.distributed.deepspeed_patches import lean_bf16_step
    from moetrain.model import MoETransformer
    from moetrain.trainer.engine import build_engine

    init_distributed()
    cfg = _train_config(ep_size=1)
    cfg.parallel.dtype = "bf16"
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    twin = copy.deepcopy(model)
    lean, *_ = build_engine(model, cfg, world)
    # bf16 ZeRO-0: the engine's optimizer step is the lean one...
    assert lean.optimizer.step.func is lean_bf16_step
    stock, *_ = build_engine(twin, cfg, world)
    del stock.optimizer.step  # ...this one runs DeepSpeed's FP16_UnfusedOptimizer.step
    assert "step" not in vars(stock.optimizer)
    before = [hp.clone() for group in lean.optimizer.fp32_groups for hp in group]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, cfg.model.vocab_size, (2, 13), generator=gen)
        for e in (lean, stock):
            e.backward(e(ids[:, :-1], ids[:, 1:]).loss)
            e.step()
    # ...and gives the same bits: bf16 weights, fp32 masters, every optimizer state tensor.
    a, b = lean.optimizer, stock.optimizer
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), name
    after = [hp for group in a.fp32_groups for hp in group]
    assert all(not torch.equal(x, y) for x, y in zip(before, after))  # every parameter moved
    for ga, gb in zip(a.fp32_groups, b.fp32_groups):
        for hp, hq in zip(ga, gb):
            assert hp.grad is None and hq.grad is None
            assert torch.equal(hp, hq)
            sa, sb = a.optimizer.state[hp], b.optimizer.state[hq]
            assert sa.keys() == sb.keys() and "exp_avg_sq" in sa
            for k in sa:
                assert torch.equal(sa[k], sb[k]), k
    assert a.loss_scale_config.cur_iter == b.loss_scale_config.cur_iter
    assert a.overflow is False and lean.skipped_steps == 0 and lean.global_steps == 3


def test_lean_bf16_optimizer_step_matches_deepspeeds_bit_for_bit():
    run_distributed(_lean_bf16_step_worker, 1, timeout=120)
