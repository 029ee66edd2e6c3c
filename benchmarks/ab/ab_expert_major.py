"""Expert-major SwiGLU experts, tried and not kept
(benchmarks/results/gemm_floor_replay_epyc-avx512bf16_2026-12-02.md).

``GroupedExperts`` runs each GEMM kind over all experts in turn (``grouped_mm``: gate for every
expert, then up, then down; the backward likewise). The variant here is one autograd Function that
runs everything of one expert together, forward (gate, up, SiLU * up, down) and backward (the six
GEMMs and the activation gradient, the input gradient as ``mm`` + ``addmm_`` into one buffer instead
of two GEMM outputs and a sum), so an expert's rows and weights are reused while they are in cache.
Forward output and weight gradients equal the grouped_mm path bit for bit (checked below); the
input gradient differs by rounding (one bf16 rounding of the summed GEMMs instead of two).

Measured on the experts alone (row counts from random top-k loads, padded to row blocks as the layer
pads them), forward + backward, in one process, interleaved with the order alternating, median of
the per-round ratios expert-major / grouped_mm.

    python benchmarks/ab/ab_expert_major.py [ROUNDS] [bf16|fp32]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from moetrain.moe.experts import GroupedExperts
from moetrain.trainer.host_memory import configure_host_allocator

SHAPES = {"small": (256, 512, 8, 2, 2048), "S1": (512, 1024, 8, 2, 4096), "S2": (512, 256, 64, 8, 4096)}


class ExpertMajor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, v1, w2, counts: list[int]):  # type: ignore[override]
        S, H = x.shape
        Fh = w1.shape[1]
        g, u, h, y = x.new_empty(S, Fh), x.new_empty(S, Fh), x.new_empty(S, Fh), x.new_empty(S, H)
        r = 0
        for e, c in enumerate(counts):
            rows = slice(r, r + c)
            r += c
            if c == 0:
                continue
            torch.mm(x[rows], w1[e].T, out=g[rows])
            torch.mm(x[rows], v1[e].T, out=u[rows])
            torch.mul(F.silu(g[rows]), u[rows], out=h[rows])
            torch.mm(h[rows], w2[e], out=y[rows])
        ctx.save_for_backward(x, w1, v1, w2, g, u, h)
        ctx.counts = counts
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w1, v1, w2, g, u, h = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dw1, dv1, dw2 = torch.zeros_like(w1), torch.zeros_like(v1), torch.zeros_like(w2)
        r = 0
        for e, c in enumerate(ctx.counts):
            rows = slice(r, r + c)
            r += c
            if c == 0:
                continue
            torch.mm(h[rows].T, dy[rows], out=dw2[e])
            dh = dy[rows] @ w2[e].T
            du = dh * F.silu(g[rows])
            dg = torch.ops.aten.silu_backward(dh.mul_(u[rows]), g[rows])
            torch.mm(dg, w1[e], out=dx[rows])
            dx[rows].addmm_(du, v1[e])
            torch.mm(dg.T, x[rows], out=dw1[e])
            torch.mm(du.T, x[rows], out=dv1[e])
        return dx, dw1, dv1, dw2, None


def run(shape: str, dtype: torch.dtype, rounds: int) -> None:
    H, Fh, E, K, T = SHAPES[shape]
    torch.manual_seed(0)
    experts = GroupedExperts(E, H, Fh, "grouped_mm")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    experts.to(dtype)
    block = experts.resolved_row_block(torch.device("cpu"), dtype)

    def new_counts() -> torch.Tensor:
        counts = torch.bincount(torch.topk(torch.randn(T, E), K).indices.flatten(), minlength=E)
        return (counts + block - 1) // block * block  # as the dispatch plan pads them

    def fwd_bwd(kind: str, x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor):
        x = x.detach().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        if kind == "grouped_mm":
            y = experts(x, counts)
        else:
            y = ExpertMajor.apply(x, experts.w1, experts.v1, experts.w2, counts.tolist())
        y.backward(dy)
        return y, x.grad, *(p.grad for p in (experts.w1, experts.v1, experts.w2))

    counts = new_counts()
    x = torch.randn(int(counts.sum()), H, dtype=dtype)
    dy = torch.randn_like(x)
    ref, alt = fwd_bwd("grouped_mm", x, dy, counts), fwd_bwd("expert_major", x, dy, counts)
    same = [torch.equal(a, b) for a, b in zip(ref, alt)]
    dx_rel = ((ref[1].float() - alt[1].float()).norm() / ref[1].float().norm()).item()
    times: dict[str, list[float]] = {"grouped_mm": [], "expert_major": []}
    for i in range(rounds + 2):
        counts = new_counts()
        x = torch.randn(int(counts.sum()), H, dtype=dtype)
        dy = torch.randn_like(x)
        for kind in list(times) if i % 2 == 0 else list(reversed(times)):
            t0 = time.perf_counter()
            fwd_bwd(kind, x, dy, counts)
            if i >= 2:
                times[kind].append((time.perf_counter() - t0) * 1e3)
    ratio = statistics.median(b / a for a, b in zip(times["grouped_mm"], times["expert_major"]))
    print(
        f"| {shape} | {str(dtype)[6:]} | {statistics.median(times['grouped_mm']):.1f} | "
        f"{statistics.median(times['expert_major']):.1f} | {ratio:.3f} | "
        f"y/dw1/dv1/dw2 equal: {same[0]}/{same[2]}/{same[3]}/{same[4]}, dx rel. diff {dx_rel:.1e} |"
    )


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 11
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[2] if len(sys.argv) > 2 else "bf16"]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    configure_host_allocator("retain")  # as training does on CPU
    print("| shape | dtype | grouped_mm ms | expert-major ms | paired ratio | checks |")
    print("|---|---|---:|---:|---:|---|")
    for shape in SHAPES:
        run(shape, dtype, rounds)


if __name__ == "__main__":
    main()
