"""``parallel.a2a_chunks``: the chunked, overlapped expert all-to-all (distributed/chunked_exchange.py)
trains like the one-piece exchange, to rounding.

- chunk bookkeeping: every copy lands in exactly one chunk, sender and receiver agree on the cuts;
- in-process at ep=2 on 2 gloo ranks: four AdamW steps with 2, 3 and 32 chunks (more than any
  expert has copies from a rank: chunks that are empty on every rank) against the same steps with one
  exchange: the same losses and weights, expert by expert, to rounding; a negative control cuts the
  sender's chunks off by one row (the receiver's cuts then disagree) and must be reported; inputs that
  need no gradient (frozen layers below) skip the dispatch's reverse exchange without a hang;
- end to end: ``parallel.a2a_chunks=2`` through the trainer equals the one-process reference.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from moetrain.distributed.chunked_exchange import chunk_counts, chunk_of_rows
from moetrain.testing import (
    LOSS_REL,
    WEIGHT_MAX_LR,
    WEIGHT_REL_ULPS,
    WEIGHT_RMS_LR,
    assert_equivalent,
    check_ok,
    ep_train_config,
    margins_paused,
    reference_run,
    rounding_rel,
    run_distributed,
    run_train,
    scaled_mismatch,
    tiny,
    weight_mismatches,
)

pytestmark = pytest.mark.multiprocess

# One exchange vs chunks: the same copies meet the same experts in GEMMs of other row counts (rounding),
# then AdamW steps. The bounds of the layout equivalence tests (moetrain.testing.equivalence): losses
# 1e-5 relative; weights expert by expert within 8 ulps of their scale plus an update allowance in
# units of the LR (Adam moves an element whose gradient is mostly rounding noise by up to ~lr).
LR = 3e-3


@pytest.mark.parametrize("chunks", [1, 2, 3, 7])
def test_chunk_cuts_cover_every_copy_once(chunks: int):
    counts = torch.tensor([0, 1, 5, 2, 9, 3])
    per_chunk = chunk_counts(counts, chunks)
    assert per_chunk.shape == (chunks, 6) and torch.equal(per_chunk.sum(0), counts)
    assert (per_chunk >= 0).all() and (per_chunk.max(0).values - per_chunk.min(0).values <= 1).all()
    rows = chunk_of_rows(counts, chunks, torch.device("cpu"))
    # rows of each group, in order, go to non-decreasing chunks with exactly per_chunk's counts
    first = 0
    for g, c in enumerate(counts.tolist()):
        mine = rows[first : first + c]
        first += c
        assert torch.equal(mine, mine.sort().values)
        assert torch.equal(torch.bincount(mine, minlength=chunks), per_chunk[:, g])


def _train_config(chunks: int):
    return ep_train_config(2, a2a_chunks=chunks, name="chunk-test")


def _train(cfg, init, batches, env) -> tuple[list[float], dict[str, torch.Tensor]]:
    import torch.distributed as dist

    from moetrain.distributed.expert_parallel import parallelize
    from moetrain.model import MoETransformer

    model = MoETransformer(cfg.model)
    model.load_state_dict(init)
    parallelize(model, cfg, env)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for inputs, labels in batches:
        opt.zero_grad()
        out = model(inputs, labels)
        out.loss.backward()
        for p in model.parameters():
            if getattr(p, "allreduce", True) and p.grad is not None:  # dense: averaged over the ranks
                dist.all_reduce(p.grad)
                p.grad /= env.world_size
        opt.step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / env.world_size)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _compare(name: str, one, chunked) -> list[str]:
    loss = scaled_mismatch(torch.tensor(chunked[0]), torch.tensor(one[0]), f"{name}: losses", rel=LOSS_REL)
    weights = weight_mismatches(
        chunked[1],
        one[1],
        rel=rounding_rel(WEIGHT_REL_ULPS),
        max_update=WEIGHT_MAX_LR * LR,
        rms_update=WEIGHT_RMS_LR * LR,
    )
    return ([loss] if loss else []) + [f"{name}: {w}" for w in weights]


def _chunked_worker(rank: int, world: int) -> None:
    import moetrain.distributed.chunked_exchange as chunked_exchange
    from moetrain.distributed import init_distributed
    from moetrain.distributed.expert_parallel import parallelize
    from moetrain.model import MoETransformer

    env = init_distributed()
    torch.manual_seed(0)
    init = copy.deepcopy(MoETransformer(_train_config(1).model).state_dict())
    gen = torch.Generator().manual_seed(1 + rank)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 96, (2, 13), generator=gen)
        batches.append((ids[:, :-1], ids[:, 1:]))
    one = _train(_train_config(1), init, batches, env)
    for chunks in (2, 3, 32):  # 24 tokens x top-2 over 4 experts: ~12 copies per (rank, expert) group
        bad = _compare(f"chunks={chunks}", one, _train(_train_config(chunks), init, batches, env))
        assert not bad, bad
    # inputs that need no gradient (frozen layers below): only the experts' and router's gradients flow,
    # and the dispatch's reverse exchange is skipped on every rank alike (no hang, same gradients)
    grads = []
    for chunks in (1, 3):
        cfg = _train_config(chunks)
        model = MoETransformer(cfg.model)
        model.load_state_dict(init)
        parallelize(model, cfg, env)
        x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(7 + rank))
        y, _ = model.moe_layers[0](x)
        y.square().sum().backward()
        grads.append({n: p.grad for n, p in model.moe_layers[0].named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) >= 4, sorted(grads[0])
    for name, g in grads[0].items():
        assert scaled_mismatch(grads[1][name], g, f"frozen input: {name}", rel=LOSS_REL) is None
    # negative control: the sender cuts a group's rows at floor(p C / c) (the receiver at the right
    # cuts): rows of groups that C does not divide reach the wrong expert
    right = chunked_exchange.chunk_of_rows

    def off_by_one(counts_G, chunks, device):
        counts = counts_G.to(device)
        group = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
        pos = torch.arange(group.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[group]
        return pos * chunks // counts[group]

    chunked_exchange.chunk_of_rows = off_by_one
    try:
        with margins_paused():
            bad = _compare("off-by-one", one, _train(_train_config(3), init, batches, env))
    finally:
        chunked_exchange.chunk_of_rows = right
    assert any("losses" in b for b in bad), f"a chunk cut off by one row went unnoticed: {bad}"


@pytest.mark.numerics
def test_chunked_exchange_trains_like_one_exchange():
    run_distributed(_chunked_worker, 2, timeout=240)


@pytest.mark.slow
@pytest.mark.numerics
def test_chunked_exchange_in_the_trainer_equals_one_process(tmp_path: Path):
    run = tmp_path / "run"
    overrides = (
        "optim.micro_batch_size=2",
        "parallel.ep_size=2",
        "parallel.a2a_chunks=2",
        "trainer.stop_at=5",
    )
    check_ok(run_train(run, *tiny(*overrides, "trainer.checkpoint_every=0", "trainer.eval_every=0"), nproc=2))
    assert_equivalent(run, reference_run().check(), range(1, 6), keys=("loss", "lm_loss"), grad_norm=True)
