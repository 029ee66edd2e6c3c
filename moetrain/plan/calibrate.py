"""``python -m moetrain.plan plan.calibrate=FILE``: measure this machine, write a cluster description.

GEMM FLOP/s by dtype at a few row counts (fit to ``eff(m) = e·m / (m + m_half)``), fused causal
attention's FLOP/s, memory bandwidth
(a large copy), and all-reduce bandwidth between 2 local gloo processes. CPU processes on one host
share its cores, so the description says ``shared_compute`` and ``devices_per_node`` = the cores.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS = (32, 128, 512, 2048)
WIDTH = 512  # the K and N of the calibration GEMMs: an expert / projection of a small model


def _best(fn, repeats: int = 5) -> float:
    """Median seconds of ``repeats`` calls after a warm-up: on a shared host the sustained speed a
    training run sees, not the best moment."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure_gemm(dtype_name: str) -> dict[int, float]:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    out = {}
    w = torch.randn(WIDTH, WIDTH * 2, dtype=dtype)
    for m in ROWS:
        x = torch.randn(m, WIDTH, dtype=dtype)
        reps = max(1, 4096 // m)

        def run(x=x, reps=reps):
            for _ in range(reps):
                torch.mm(x, w)

        out[m] = 2 * m * WIDTH * WIDTH * 2 * reps / _best(run)
    return out


def fit_efficiency(flops: dict[int, float]) -> tuple[float, float]:
    """(peak, m_half) of f(m) = peak * m / (m + m_half): peak = the largest GEMM's rate, m_half the
    median of m * (peak / f(m) - 1) over the smaller ones (robust to a noisy point on a shared host)."""
    m_max = max(flops)
    peak = flops[m_max]
    halves = sorted(m * max(0.0, peak / f - 1) for m, f in flops.items() if m != m_max)
    return peak, halves[len(halves) // 2] if halves else 0.0


ATTENTION_SHAPE = (4, 8, 512, 64)  # batch, heads, seq_len, head_dim: a causal self-attention of a small model


def measure_attention(dtype_name: str) -> float:
    """FLOP/s of causal ``scaled_dot_product_attention``, forward + backward, counted as plan counts
    attention (QK^T and AV over the mean causal context, backward twice the forward): fused attention
    kernels run far below the GEMM peak on CPUs (softmax, masking, blocking), so it gets its own rate."""
    import torch
    import torch.nn.functional as F

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    b, h, s, d = ATTENTION_SHAPE
    q, k, v = (torch.randn(b, h, s, d, dtype=dtype, requires_grad=True) for _ in range(3))

    def run():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    mean_context = (s + 1) / 2
    return 3 * 4 * h * d * mean_context * s * b / _best(run)


def measure_memory_bandwidth() -> float:
    import torch

    src = torch.ones(32 * 2**20)  # 128 MiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best(lambda: dst.copy_(src))  # read + write


def _allreduce_worker(rank: int, port: int, nbytes: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.ones(nbytes // 4)
    small = torch.ones(1)
    dist.all_reduce(t)
    bw_time = _best(lambda: dist.all_reduce(t), repeats=3)
    lat = _best(lambda: dist.all_reduce(small), repeats=20)
    if rank == 0:
        Path(out).write_text(json.dumps({"time": bw_time, "latency": lat}))
    dist.destroy_process_group()


def measure_allreduce(nbytes: int = 16 * 2**20) -> tuple[float, float]:
    """Bytes/s one process sends in a 2-process ring all-reduce (bus bandwidth), and the latency."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        mp.spawn(_allreduce_worker, args=(port, nbytes, out), nprocs=2, join=True)
        r = json.loads(Path(out).read_text())
    # a 2-rank ring sends 2 * (2-1)/2 * nbytes per rank; latency: 2 steps
    return nbytes / r["time"], r["latency"] / 2


def calibrate() -> dict[str, Any]:
    import torch

    from moetrain.plan.machine import host_available_memory

    flops, half, attention = {}, {}, {}
    measured: dict[str, Any] = {}
    for d in ("fp32", "bf16"):
        points = measure_gemm(d)
        measured[d] = {str(m): f for m, f in points.items()}
        flops[d], half[d] = fit_efficiency(points)
        attention[d] = measure_attention(d)
    bw, lat = measure_allreduce()
    cores = torch.get_num_threads()
    mem = host_available_memory() or 0
    return {
        "name": f"{socket.gethostname()}-cpu",
        "source": f"measured by moetrain.plan.calibrate on {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        f"{cores} threads",
        # the fitted peak is reached by large GEMMs: efficiency 1 at that peak, the fp32 row curve
        "matmul_flops": flops,
        "gemm_efficiency": 1.0,
        "gemm_half_rows": half["fp32"],
        "gemm_half_rows_by_dtype": half,
        "gemm_measured_flops": measured,
        "attention_flops": attention,
        "memory_bandwidth": measure_memory_bandwidth(),
        "intra_node_bandwidth": bw,
        "inter_node_bandwidth": bw,
        "intra_node_latency": lat,
        "inter_node_latency": lat,
        "devices_per_node": cores,
        "shared_compute": True,
        "host_bandwidth": measure_memory_bandwidth(),
        "memory_gib": round(mem / 2**30, 1),
    }


def write_calibration(path: str) -> dict[str, Any]:
    data = calibrate()
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(target)  # never a half-written file
    return data
