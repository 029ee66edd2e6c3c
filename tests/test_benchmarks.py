"""The layer benchmark's GEMM floor and routing-only variant measure what they claim to, and the
script runs end to end.

Nothing here times anything: speed lives in benchmarks/ (benchmarks/README.md)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import bench_moe_layer

        yield bench_moe_layer
    finally:
        sys.path.remove(str(BENCH_DIR))


def _ops(calls) -> Counter:
    return Counter(func.__name__.split(".")[0] for func, _, _ in calls)


def test_gemms_replay_records_every_gemm_of_one_forward_and_backward(bench):
    H, Fh, E, K, tokens = 32, 64, 4, 2, 64
    torch.manual_seed(0)
    variants, skipped = bench.build_variants(
        H, Fh, E, K, tokens, torch.device("cpu"), torch.float32, ["gemms_replay", "gemms_replay_dense"]
    )
    assert not skipped
    moe, dense = variants["gemms_replay"], variants["gemms_replay_dense"]
    # router: logits forward, its weight and input gradients; experts: gate, up, down forward, and
    # per projection an input and a weight gradient, all grouped
    assert _ops(moe.calls) == Counter({"mm": 3, "_grouped_mm": 9})
    assert _ops(dense.calls) == Counter({"mm": 9})  # three projections, forward and two gradients each
    grouped = [args for func, args, _ in moe.calls if "grouped" in func.__name__]
    assert all(a[0].shape[0] in (tokens * K, Fh, H) for a in grouped)  # the copies, or their transpose
    first = [id(args[0]) for _, args, _ in moe.calls]
    moe.resample()  # a new input, a new recording
    assert [id(args[0]) for _, args, _ in moe.calls] != first
    tiny = torch.zeros(1)
    assert moe(tiny) is tiny and dense(tiny) is tiny  # the replay runs on the recorded tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: row blocks padded in the plan
def test_routing_only_is_the_layer_without_its_experts(bench, dtype):
    H, Fh, E, K, tokens = 32, 64, 4, 2, 64
    torch.manual_seed(0)
    variants, _ = bench.build_variants(H, Fh, E, K, tokens, torch.device("cpu"), dtype, ["routing_only"])
    fwd = variants["routing_only"]
    x = torch.randn(tokens, H, dtype=dtype, requires_grad=True)
    recorder = bench._GemmRecorder()
    with recorder:
        out = fwd(x)
        out.sum().backward()
    assert _ops(recorder.calls) == Counter({"mm": 3})  # the router's; no expert GEMM runs
    assert all(p.grad is None for p in fwd.module.experts.parameters())
    # Every copy reaches the combine unchanged: each token comes back as the weighted sum of its k
    # copies of itself (the weights of a top-k Mixtral router sum to 1).
    routing = fwd.module.router(x.detach())
    torch.testing.assert_close(out.detach(), x.detach() * routing.weights_NK.sum(-1, keepdim=True))


def test_derived_ratios_are_medians_of_per_round_ratios(bench):
    times = {
        "gemms_replay": [3.0, 6.0, 30.0],
        "gemms_replay_dense": [2.0, 4.0, 10.0],
        "routing_only": [1.0, 1.0, 1.0],
        "dense": [4.0, 8.0, 12.0],
    }
    floors = bench.derived_ratios(times)
    assert floors["floor_gemm"][1] == 1.5  # rounds 1.5, 1.5, 3.0
    assert floors["sum_of_parts"][1] == 1.5  # rounds (3+1+4-2)/4, (6+1+8-4)/8, (30+1+12-10)/12
    assert "sum_of_parts" not in bench.derived_ratios({k: v for k, v in times.items() if k != "routing_only"})


def test_layer_benchmark_runs_and_prints_the_gemm_floor():
    cmd = [
        sys.executable,
        str(BENCH_DIR / "bench_moe_layer.py"),
        "--device=cpu",
        "--shapes=small",
        "--dtypes=fp32",
        "--tokens=64",
        "--repeats=1",
        "--warmup=0",
        "--peak-size=64",
        "--variants=moetrain,gemms_replay,gemms_replay_dense,routing_only,dense,no_such_variant",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any("GEMM floor: gemms_replay / gemms_replay_dense" in line for line in lines)
    assert any(
        "sum of parts: (gemms_replay + routing_only + dense - gemms_replay_dense)" in line for line in lines
    )
    assert sum("| dense |" in line for line in lines) == 1  # "dense" in --variants is not a second row
    assert any("no_such_variant | n/a: unknown variant" in line for line in lines)


def test_document_masking_benchmark_runs(tmp_path: Path):
    out = tmp_path / "masking.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH_DIR / "bench_document_masking.py"),
            *("--model", "mixtral_tiny", "--vocab", "512", "--seq-len", "32", "--batch", "2"),
            *("--doc-len", "8", "--repeats", "1", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "masked/causal: step" in proc.stdout and out.is_file()
