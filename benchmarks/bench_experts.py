"""Expert kernels side by side: torch grouped_mm vs a per-expert loop, forward + backward.

Default shape is mixtral_small's MoE layer (H=256, F=512, E=8, top-2) on 2048 tokens, i.e. 4096
token copies sorted by expert, as the MoE layer feeds them. Each timed step is one forward and one
backward (grads of x, w1, v1, w2); the median of ``--repeats`` steps is reported, after warm-up.

    .venv/bin/python benchmarks/bench_experts.py --threads 2 --repeats 20

Prints one markdown table row per dtype: median and best step times of each kernel, and the median
of the per-step ratios loop / grouped_mm (the two kernels alternate step by step, so load from
other processes on a shared machine affects both alike).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moetrain.moe.experts import GroupedExperts


def make_inputs(tokens: int, top_k: int, experts: int, hidden: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    ids = logits.topk(top_k, dim=-1).indices.reshape(-1)
    counts = torch.bincount(ids, minlength=experts)
    x = torch.randn(tokens * top_k, hidden, generator=g).to(dtype)  # copies, already sorted by expert
    grad = torch.randn(tokens * top_k, hidden, generator=g).to(dtype)
    return x, counts, grad


def step(module: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    for p in module.parameters():
        p.grad = None
    xi = x.detach().requires_grad_(True)
    out = module(xi, counts)
    out.backward(grad)
    return out


def time_impl(module, impl, x, counts, grad, warmup: int, repeats: int) -> list[float]:
    module.impl = impl
    for _ in range(warmup):
        step(module, x, counts, grad)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(module, x, counts, grad)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if not hasattr(torch.nn.functional, "grouped_mm"):
        raise SystemExit(f"torch {torch.__version__} has no torch.nn.functional.grouped_mm")
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}

    print(
        f"# torch {torch.__version__}, {args.threads} threads, H={args.hidden} F={args.ffn} E={args.experts} "
        f"k={args.top_k}, {args.tokens} tokens, {args.repeats} alternating fwd+bwd steps each; ratio = median of loop/grouped_mm per pair"
    )
    print(
        "| dtype | copies | loop ms, median | grouped_mm ms, median | loop ms, min | grouped_mm ms, min | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.dtypes.split(","):
        dtype = dtypes[name]
        torch.manual_seed(args.seed)
        module = GroupedExperts(args.experts, args.hidden, args.ffn, impl="loop")
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.02)
        module = module.to(dtype)
        x, counts, grad = make_inputs(args.tokens, args.top_k, args.experts, args.hidden, dtype, args.seed)

        # Same numbers from both kernels before timing them.
        module.impl = "loop"
        ref = step(module, x, counts, grad).detach().float()
        module.impl = "grouped_mm"
        got = step(module, x, counts, grad).detach().float()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)

        # Alternate the kernels step by step (loop, grouped_mm, loop, ...) so that background load on a
        # shared machine hits both alike; the ratio is the median of the per-pair ratios.
        for impl in ("loop", "grouped_mm"):
            time_impl(module, impl, x, counts, grad, args.warmup, 0)
        loop_t, gmm_t = [], []
        for _ in range(args.repeats):
            loop_t += time_impl(module, "loop", x, counts, grad, 0, 1)
            gmm_t += time_impl(module, "grouped_mm", x, counts, grad, 0, 1)
        ratio = statistics.median(a / b for a, b in zip(loop_t, gmm_t))
        print(
            f"| {name} | {x.shape[0]} | {statistics.median(loop_t) * 1e3:.1f} | {statistics.median(gmm_t) * 1e3:.1f} "
            f"| {min(loop_t) * 1e3:.1f} | {min(gmm_t) * 1e3:.1f} | {ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
