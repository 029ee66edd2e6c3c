"""Before/after in one process: the combine's backward as it was (gather, row dot, scale) and as it is
(fp32: a weighted ``embedding_bag`` and ``embedding_bag``'s per-sample-weight backward; CPU half
types: as before), and the router's entropy metric (-sum p log p vs lse - <p, logits>), interleaved
with the order alternating, median of the per-round ratios new/old. Pieces alone, then the whole MoE
layer (combine backward before vs now; the entropy is new in both) next to a dense SwiGLU of equal
active FLOPs, ``.grad`` set to None before every round (a step without gradient accumulation).

    python benchmarks/ab/ab_combine_router.py [ROUNDS]
    python benchmarks/ab/ab_combine_router.py train GRAD_ACCUM ROUNDS [DTYPE]   # whole training steps

``train``: mixtral_small's training step (as ``bench_train_step.py`` builds it) with the combine
backward before and now, and dense_small's, interleaved in one process.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import moetrain.moe.dispatch as dispatch
from moetrain.config import MoEConfig
from moetrain.model.layers import SwiGLU
from moetrain.moe import MoELayer
from moetrain.trainer.host_memory import configure_host_allocator

SHAPES = {"small": (256, 512, 8, 2, 2048), "S2": (512, 256, 64, 8, 4096)}  # H, F, E, k, tokens
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def old_combine_backward(ctx, grad_NH):
    """The backward before: gather dout per copy, row dot with y, scale in place (bmm dot in fp32)."""
    y_SH, weights_NK, position_NK, token_idx_S, slot_idx_S = ctx.saved_tensors
    grad_SH = grad_NH.index_select(0, token_idx_S)
    if y_SH.dtype in (torch.float32, torch.float64):
        dot_S = torch.bmm(grad_SH.unsqueeze(1), y_SH.unsqueeze(2)).view(-1)
    else:
        dot_S = (grad_SH * y_SH).sum(-1)
    grad_w = dot_S.index_select(0, position_NK.reshape(-1)).view_as(weights_NK)
    w_S = F.pad(weights_NK.reshape(-1), (0, 1)).index_select(0, slot_idx_S).unsqueeze(-1)
    return grad_SH.mul_(w_S), grad_w, None, None, None


NEW_BACKWARD = dispatch._WeightedUngather.backward


def use(old: bool) -> None:
    dispatch._WeightedUngather.backward = staticmethod(old_combine_backward if old else NEW_BACKWARD)


def paired(fns: dict, rounds: int, warmup: int = 3) -> dict:
    """fns: name -> callable; 'old' and 'new' among them. Returns medians (ms) and new/old."""
    ts: dict[str, list[float]] = {k: [] for k in fns}
    ratios = []
    for i in range(warmup + rounds):
        order = list(fns) if i % 2 == 0 else list(reversed(fns))
        row = {}
        for k in order:
            t = time.perf_counter()
            fns[k]()
            row[k] = (time.perf_counter() - t) * 1e3
        if i >= warmup:
            for k, v in row.items():
                ts[k].append(v)
            ratios.append(row["new"] / row["old"])
    out = {k: statistics.median(v) for k, v in ts.items()}
    out["new/old"] = statistics.median(ratios)
    return out


def pieces(H, Fh, E, K, N, dt, rounds):
    gen = torch.Generator().manual_seed(0)
    ids = torch.topk(torch.randn(N, E, generator=gen), K).indices
    plan = dispatch.plan_dispatch(ids, E, None)
    y = torch.randn(N * K, H, dtype=dt, generator=gen)
    w = torch.rand(N, K, generator=gen).to(dt)
    g = torch.randn(N, H, generator=gen).to(dt)

    def combine(old):
        use(old)
        y_ = y.detach().requires_grad_(True)
        w_ = w.detach().requires_grad_(True)
        dispatch.combine(y_, plan, w_, N).backward(g)

    logits = torch.randn(N, E, generator=gen)
    c = paired({"old": lambda: combine(True), "new": lambda: combine(False)}, rounds)
    probs, lse = F.softmax(logits, dim=-1), torch.logsumexp(logits, dim=-1)
    e = paired(
        {
            "old": lambda: -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean(),
            "new": lambda: (lse - (probs * logits).sum(-1)).mean(),
        },
        rounds * 4,
    )
    use(False)
    return c, e


def layer(H, Fh, E, K, N, dt, rounds):
    torch.manual_seed(0)
    moe = MoELayer(H, Fh, E, K, MoEConfig(backend="torch"))
    dense = SwiGLU(H, K * Fh)
    for p in (*moe.parameters(), *dense.parameters()):
        nn.init.normal_(p, std=0.02)
    moe, dense = moe.to(dt), dense.to(dt)
    xs = [torch.randn(N, H, dtype=dt) for _ in range(4)]  # new routing each round, as in training
    g = torch.randn(N, H, dtype=dt)
    step = [0]

    def run(module, old=None):
        if old is not None:
            use(old)
        module.zero_grad(set_to_none=True)
        x = xs[step[0] % 4].detach().requires_grad_(True)
        out = module(x.unsqueeze(0))
        (out[0] if isinstance(out, tuple) else out).reshape(N, H).backward(g)

    def dense_step():
        step[0] += 1
        run(dense)

    r = paired({"dense": dense_step, "old": lambda: run(moe, True), "new": lambda: run(moe, False)}, rounds)
    use(False)
    return r


def train(grad_accum: int, rounds: int, dtype: str) -> None:
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import bench_train_step as bench

    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(bench._free_port()))
    tmp = Path(tempfile.mkdtemp())
    trainers = {
        e: bench.build_trainer(bench.compose(e, dtype, grad_accum, []), tmp / e)
        for e in ("mixtral_small", "dense_small")
    }

    def step(name, old=None):
        if old is not None:
            use(old)
        bench.timed_step(trainers[name])

    r = paired(
        {
            "dense": lambda: step("dense_small"),
            "old": lambda: step("mixtral_small", True),
            "new": lambda: step("mixtral_small", False),
        },
        rounds,
    )
    print(
        f"{dtype} grad_accum {grad_accum}: step ms dense {r['dense']:.0f}, MoE old {r['old']:.0f} / new "
        f"{r['new']:.0f}; MoE/dense tokens/s old {r['dense'] / r['old']:.3f} / new {r['dense'] / r['new']:.3f}; "
        f"paired step new/old {r['new/old']:.3f}; load {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        train(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "bf16")
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    configure_host_allocator("retain")  # as training does on CPU
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(
        "| shape | dtype | combine fwd+bwd old / new ms (new/old) | entropy old / new us "
        "| layer old / new (x dense) | layer new/old |"
    )
    print("|---|---|---|---|---|---|")
    for shape, (H, Fh, E, K, N) in SHAPES.items():
        for name, dt in DTYPES.items():
            n = max(6, rounds // (4 if shape == "S2" else 1))
            c, e = pieces(H, Fh, E, K, N, dt, n)
            lay = layer(H, Fh, E, K, N, dt, n)
            print(
                f"| {shape} | {name} | {c['old']:.2f} / {c['new']:.2f} ({c['new/old']:.2f}) "
                f"| {e['old'] * 1e3:.0f} / {e['new'] * 1e3:.0f} "
                f"| {lay['old'] / lay['dense']:.3f} / {lay['new'] / lay['dense']:.3f} | {lay['new/old']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
