"""Before/after in one process: mixtral_small with main's paths (scatter-add dispatch, per-tensor
AdamW, float64-copy grad norm) vs mixtral_small as it is now vs dense_small, whole training steps
interleaved; prints each median step and the tokens/s ratios to dense.

    TH=1 python benchmarks/ab/ab_train_paths.py GRAD_ACCUM REPEATS
"""

import dataclasses
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_train_step as bench  # noqa: E402
import torch  # noqa: E402

import moetrain.moe.layer as layer_module  # noqa: E402
import moetrain.trainer.engine as engine_module  # noqa: E402
import moetrain.trainer.loop as loop_module  # noqa: E402

ga, reps = int(sys.argv[1]), int(sys.argv[2])
tmp = Path(tempfile.mkdtemp())
real_plan = layer_module.plan_dispatch
real_grad_norm = loop_module.global_grad_norm


def old_plan(*args):
    return dataclasses.replace(real_plan(*args), position_NK=None)


@torch.no_grad()
def old_grad_norm(model, ep):
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum()
    return math.sqrt(float(total))


new = bench.build_trainer(bench.compose("mixtral_small", "fp32", ga, []), tmp / "new")
real_fused = engine_module.fused_adamw_supported
engine_module.fused_adamw_supported = lambda device: False
old = bench.build_trainer(bench.compose("mixtral_small", "fp32", ga, []), tmp / "old")
engine_module.fused_adamw_supported = real_fused
dense = bench.build_trainer(bench.compose("dense_small", "fp32", ga, []), tmp / "dense")
torch.set_num_threads(int(os.environ.get("TH", "1")))


def step_old() -> float:
    layer_module.plan_dispatch = old_plan
    loop_module.global_grad_norm = old_grad_norm
    try:
        return bench.timed_step(old)
    finally:
        layer_module.plan_dispatch = real_plan
        loop_module.global_grad_norm = real_grad_norm


fns = {"new": lambda: bench.timed_step(new), "old": step_old, "dense": lambda: bench.timed_step(dense)}
ts: dict[str, list[float]] = {k: [] for k in fns}
for i in range(reps + 1):
    for k, f in fns.items():
        t = f()
        if i > 0:
            ts[k].append(t)
m = {k: statistics.median(v) for k, v in ts.items()}
print(
    f"grad_accum {ga}",
    {k: round(v * 1e3) for k, v in m.items()},
    f"tokens/s vs dense: new {m['dense'] / m['new']:.3f} old {m['dense'] / m['old']:.3f}; "
    f"new/old time {m['new'] / m['old']:.3f}; load {os.getloadavg()[0]:.1f}",
)
