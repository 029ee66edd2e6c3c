"""Before/after in one process: the MoE layer with main's scatter-add dispatch (``position_NK=None``)
vs the gather/embedding_bag path vs a dense SwiGLU of equal active FLOPs, fwd+bwd, interleaved.

    TH=1 DET=1 python benchmarks/ab/ab_layer_paths.py H F E K TOKENS fp32 REPEATS
"""

import dataclasses
import os
import statistics
import sys
import time

import torch
from torch import nn

import moetrain.moe.layer as layer_module
from moetrain.config import MoEConfig
from moetrain.model.layers import SwiGLU
from moetrain.moe import MoELayer

torch.set_num_threads(int(os.environ.get("TH", "1")))
torch.use_deterministic_algorithms(os.environ.get("DET") == "1")  # the trainer runs deterministic
H, Fh, E, K, N = (int(a) for a in sys.argv[1:6])
dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[6]]
torch.manual_seed(0)
layer = MoELayer(H, Fh, E, K, MoEConfig(backend="torch"))
for p in layer.parameters():
    nn.init.normal_(p, std=0.02)
layer = layer.to(dt)
dense = SwiGLU(H, K * Fh).to(dt)
x = torch.randn(N, H, dtype=dt)
g = torch.randn_like(x)
real_plan = layer_module.plan_dispatch


def old_plan(*args):
    return dataclasses.replace(real_plan(*args), position_NK=None)


def moe(old: bool) -> None:
    layer_module.plan_dispatch = old_plan if old else real_plan
    try:
        out, _ = layer(x.detach().requires_grad_(True).unsqueeze(0))
        out.squeeze(0).backward(g)
    finally:
        layer_module.plan_dispatch = real_plan


def den() -> None:
    dense(x.detach().requires_grad_(True)).backward(g)


fns = {"dense": den, "old": lambda: moe(True), "new": lambda: moe(False)}
ts: dict[str, list[float]] = {k: [] for k in fns}
for _ in range(int(sys.argv[7])):
    for k, f in fns.items():
        layer.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        t = time.perf_counter()
        f()
        ts[k].append(time.perf_counter() - t)
m = {k: statistics.median(v[2:]) * 1e3 for k, v in ts.items()}
print(
    sys.argv[1:7],
    {k: round(v, 1) for k, v in m.items()},
    f"old/dense {m['old'] / m['dense']:.3f} new/dense {m['new'] / m['dense']:.3f} new/old {m['new'] / m['old']:.3f}",
    f"load {os.getloadavg()[0]:.1f}",
)
