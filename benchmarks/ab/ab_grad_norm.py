"""The loop's global gradient norm (``Trainer._grad_norm``: one ``vector_norm`` per tensor, float64
accumulation) against one ``torch._foreach_norm`` call over all of them (tried, not kept:
benchmarks/results/gemm_floor_replay_epyc-avx512bf16_2026-12-02.md), on the real mixtral_small and
dense_small models as ``python -m moetrain.train`` builds them, gradients filled with noise. The
script checks the two norms are equal to the last bit, then times them interleaved with the order
alternating (median ms, median of per-round ratios foreach / loop).

    python benchmarks/ab/ab_grad_norm.py [ROUNDS] [bf16|fp32]
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_train_step as bts  # noqa: E402  (sets the single-process environment first)


def foreach_grad_norm(trainer) -> float:
    params = [p for p in trainer.model.parameters() if p.grad is not None]
    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm([p.grad.detach() for p in params], 2, dtype=torch.float64)
    for p, norm in zip(params, norms, strict=True):
        sq = norm.square()
        if getattr(p, "allreduce", True) is False:
            expert += sq
        else:
            dense += sq
    return math.sqrt(float(dense + expert))


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    dtype = sys.argv[2] if len(sys.argv) > 2 else "bf16"
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    print("| model | dtype | parameters | loop ms | foreach ms | paired foreach/loop |")
    print("|---|---|---:|---:|---:|---:|")
    for name in bts.EXPERIMENTS:
        trainer = bts.build_trainer(bts.compose(name, dtype, 1, []), tmp / name)
        torch.manual_seed(0)
        for p in trainer.model.parameters():
            p.grad = torch.randn_like(p)
        new, old = foreach_grad_norm(trainer), trainer._grad_norm()
        assert new == old, (new, old)
        fns = {"old": trainer._grad_norm, "new": lambda t=trainer: foreach_grad_norm(t)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(rounds + 3):
            for k in list(fns) if i % 2 == 0 else list(reversed(fns)):
                t0 = time.perf_counter()
                fns[k]()
                if i >= 3:
                    times[k].append((time.perf_counter() - t0) * 1e3)
        n = sum(p.numel() for p in trainer.model.parameters())
        ratio = statistics.median(b / a for a, b in zip(times["old"], times["new"]))
        print(
            f"| {name} | {dtype} | {n / 1e6:.1f}M | {statistics.median(times['old']):.2f} | "
            f"{statistics.median(times['new']):.2f} | {ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
