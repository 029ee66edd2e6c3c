"""The whole MoE layer (router -> dispatch -> experts -> combine) vs a dense SwiGLU of equal active FLOPs.

Forward + backward per step, interleaved step by step (dense, MoE grouped_mm, MoE loop), median of
``--repeats``; on CUDA timed with CUDA events after a synchronize, on CPU with perf_counter. Shapes:

- ``small``: mixtral_small's layer, H256 F512 E8 top-2
- ``S1``: H512 F1024 E8 top-2 (coarse experts)
- ``S2``: H512 F256 E64 top-8 (fine-grained experts)

The dense twin has ``F_dense = top_k * F`` so its FLOPs equal the MoE layer's active expert FLOPs
(the router's E*H per token is extra for the MoE). Prints a markdown table: ms per step, the
MoE/dense ratio, and the device.

    .venv/bin/python benchmarks/bench_moe_layer.py --device cpu --threads 2 --tokens 2048
    python benchmarks/bench_moe_layer.py --device cuda --tokens 16384      # on a GPU host
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch import nn

from moetrain.config import MoEConfig
from moetrain.model.layers import SwiGLU
from moetrain.moe import MoELayer

SHAPES = {"small": (256, 512, 8, 2), "S1": (512, 1024, 8, 2), "S2": (512, 256, 64, 8)}


def _timer(device: torch.device):
    if device.type == "cuda":

        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

    else:

        def run(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="small,S1,S2")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU device only)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    timer = _timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{args.threads}"
    print(
        f"device: {name}, torch {torch.__version__}, {args.tokens} tokens, fwd+bwd, median of {args.repeats}"
    )
    print("| shape | dtype | dense ms | MoE grouped_mm ms | MoE loop ms | grouped/dense | loop/dense |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        H, Fh, E, K = SHAPES[shape]
        for dt_name in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
            torch.manual_seed(0)
            dense = SwiGLU(H, K * Fh).to(device, dtype)
            layers = {}
            for impl in ("grouped_mm", "loop"):
                layer = MoELayer(H, Fh, E, K, MoEConfig(backend="torch", expert_impl=impl))
                for p in layer.parameters():
                    nn.init.normal_(p, std=0.02)
                layers[impl] = layer.to(device, dtype)
            x = torch.randn(args.tokens, H, device=device, dtype=dtype)
            grad = torch.randn_like(x)

            def step_dense(x=x, grad=grad, dense=dense):
                xi = x.detach().requires_grad_(True)
                dense(xi).backward(grad)

            def step_moe(layer, x=x, grad=grad):
                xi = x.detach().requires_grad_(True)
                out, stats = layer(xi.unsqueeze(0))
                out.squeeze(0).backward(grad)

            fns = {
                "dense": step_dense,
                "grouped_mm": functools.partial(step_moe, layers["grouped_mm"]),
                "loop": functools.partial(step_moe, layers["loop"]),
            }
            times: dict[str, list[float]] = {k: [] for k in fns}
            for i in range(args.warmup + args.repeats):
                for k, fn in fns.items():  # interleaved: background load hits every variant alike
                    ms = timer(fn)
                    if i >= args.warmup:
                        times[k].append(ms)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"| {shape} H{H} F{Fh} E{E} k{K} | {dt_name} | {med['dense']:.3f} | {med['grouped_mm']:.3f} "
                f"| {med['loop']:.3f} | {med['grouped_mm'] / med['dense']:.2f} | {med['loop'] / med['dense']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
