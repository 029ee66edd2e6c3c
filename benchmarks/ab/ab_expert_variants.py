"""Expert-FFN variants tried and not kept
(benchmarks/results/combine_router_entropy_epyc-avx512bf16_2026-12-02.md), measured in one process,
interleaved with the order alternating, medians:

1. ``gate_up``: gate and up as one grouped GEMM against [w1; v1] ([E, 2F, H]) vs two, per GEMM kind
   (forward, input gradient incl. the sum of the two, weight gradient), plus the two costs fusing brings
   (the weight concatenation; SiLU over one half of the [S, 2F] output, a strided view).
2. ``shapes``: per-expert GEMMs (``grouped_mm`` forward) with equal row counts vs alternating counts of
   the same total (does switching GEMM shapes from expert to expert cost anything?).
3. ``compile``: ``torch.compile`` of the SwiGLU activation ``silu(g) * u``, forward + backward, vs
   eager; the first compile and the recompile for a new row count, in seconds (needs a C++ compiler).

    python benchmarks/ab/ab_expert_variants.py [gate_up,shapes,compile] [ROUNDS]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from moetrain.trainer.host_memory import configure_host_allocator

SHAPES = {"small": (8, 256, 512, 4096), "S2": (64, 512, 256, 32768)}  # E, H, F, token copies (N * k)


def medians(fns: dict, rounds: int, warmup: int = 2) -> dict:
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + rounds):
        for k in list(fns) if i % 2 == 0 else list(reversed(fns)):
            t = time.perf_counter()
            fns[k]()
            if i >= warmup:
                ts[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in ts.items()}


def row_counts(E: int, S: int, block: int, gen: torch.Generator) -> torch.Tensor:
    counts = torch.multinomial(torch.ones(E), S, replacement=True, generator=gen).bincount(minlength=E)
    return (counts + block - 1) // block * block


def gate_up(dtype: torch.dtype, rounds: int) -> None:
    print(
        f"\n{dtype}: ms | fwd 2 GEMMs / 1 | dx 2 + sum / 1 | dw 2 / 1 | cat [w1; v1] | silu contiguous / half"
    )
    for shape, (E, H, Fh, S) in SHAPES.items():
        m = _gate_up_shape(dtype, E, H, Fh, S, rounds if shape == "small" else max(4, rounds // 4))
        print(
            f"{shape}: fwd {m['fwd2']:.2f} / {m['fwd1']:.2f} | dx {m['dx2']:.2f} / {m['dx1']:.2f} | "
            f"dw {m['dw2']:.2f} / {m['dw1']:.2f} | cat {m['cat']:.2f} | silu {m['silu']:.2f} / {m['silu_half']:.2f}"
        )


def _gate_up_shape(dtype: torch.dtype, E: int, H: int, Fh: int, S: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    w1, v1 = (torch.randn(E, Fh, H, generator=gen).to(dtype) for _ in range(2))
    w13 = torch.cat([w1, v1], 1)
    counts = row_counts(E, S, 32 if dtype == torch.bfloat16 else 1, gen)
    offs, n = counts.cumsum(0).to(torch.int32), int(counts.sum())
    x = torch.randn(n, H, generator=gen).to(dtype)
    dgu = torch.randn(n, 2 * Fh, generator=gen).to(dtype)
    dg, du = dgu[:, :Fh].contiguous(), dgu[:, Fh:].contiguous()
    return medians(
        {
            "fwd2": lambda: (
                F.grouped_mm(x, w1.transpose(1, 2), offs=offs),
                F.grouped_mm(x, v1.transpose(1, 2), offs=offs),
            ),
            "fwd1": lambda: F.grouped_mm(x, w13.transpose(1, 2), offs=offs),
            "dx2": lambda: F.grouped_mm(dg, w1, offs=offs).add_(F.grouped_mm(du, v1, offs=offs)),
            "dx1": lambda: F.grouped_mm(dgu, w13, offs=offs),
            "dw2": lambda: (F.grouped_mm(dg.t(), x, offs=offs), F.grouped_mm(du.t(), x, offs=offs)),
            "dw1": lambda: F.grouped_mm(dgu.t(), x, offs=offs),
            "cat": lambda: torch.cat([w1, v1], 1),
            "silu": lambda: F.silu(dg),
            "silu_half": lambda: F.silu(dgu[:, :Fh]),
        },
        rounds,
    )


def shapes(rounds: int) -> None:
    E, H, Fh = 64, 512, 256
    w = torch.randn(E, Fh, H).to(torch.bfloat16)
    x = torch.randn(E * 544, H).to(torch.bfloat16)
    patterns = {"all 512": [512] * E, "480/544 alternating": [480, 544] * (E // 2)}

    def run(counts):
        c = torch.tensor(counts)
        F.grouped_mm(x[: int(c.sum())], w.transpose(1, 2), offs=c.cumsum(0).to(torch.int32))

    m = medians({k: (lambda c=c: run(c)) for k, c in patterns.items()}, rounds)
    print(
        "\nbf16 grouped_mm forward, 64 experts, 32768 rows: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in m.items())
    )


def compiled(rounds: int) -> None:
    def swiglu(g, u):
        return F.silu(g) * u

    def make(rows):
        g, u = (torch.randn(rows, 512).to(torch.bfloat16).requires_grad_(True) for _ in range(2))
        return g, u, torch.randn(rows, 512).to(torch.bfloat16)

    fused = torch.compile(swiglu, dynamic=False)
    g, u, d = make(4224)
    t = time.perf_counter()
    fused(g, u).backward(d)
    first = time.perf_counter() - t
    m = medians(
        {"eager": lambda: swiglu(g, u).backward(d), "compiled": lambda: fused(g, u).backward(d)}, rounds
    )
    g2, u2, d2 = make(4160)
    t = time.perf_counter()
    fused(g2, u2).backward(d2)
    again = time.perf_counter() - t
    print(
        f"\nSwiGLU activation [4224, 512] bf16 fwd+bwd: eager {m['eager']:.2f} ms, compiled "
        f"{m['compiled']:.2f} ms; first compile {first:.1f} s, new row count {again:.1f} s"
    )


def main() -> None:
    which = (sys.argv[1] if len(sys.argv) > 1 else "gate_up,shapes,compile").split(",")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    configure_host_allocator("retain")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    if "gate_up" in which:
        for dtype in (torch.bfloat16, torch.float32):
            gate_up(dtype, rounds)
    if "shapes" in which:
        shapes(rounds)
    if "compile" in which:
        compiled(rounds)


if __name__ == "__main__":
    main()
