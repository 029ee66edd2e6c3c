"""Before/after in one process: the LM loss fused with the head (model/lm_loss.py) vs the plain path
(logits, then F.cross_entropy), whole training steps interleaved, for mixtral_small and dense_small.
The plain path is swapped in by replacing ``linear_cross_entropy`` in the transformer's namespace.

    python benchmarks/ab/ab_lm_loss.py GRAD_ACCUM SECONDS [DTYPE]
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_train_step as bench  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import moetrain.model.transformer as transformer_module  # noqa: E402

ga, seconds = int(sys.argv[1]), float(sys.argv[2])
dtype = sys.argv[3] if len(sys.argv) > 3 else "fp32"
tmp = Path(tempfile.mkdtemp())
fused_loss = transformer_module.linear_cross_entropy


def plain_loss(h_NH, weight_VH, labels_N, ignore_index=-100):
    return F.cross_entropy(F.linear(h_NH, weight_VH).float(), labels_N, ignore_index=ignore_index)


trainers = {
    m: bench.build_trainer(bench.compose(m, dtype, ga, []), tmp / m) for m in ("mixtral_small", "dense_small")
}
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def step(model: str, loss_fn) -> float:
    transformer_module.linear_cross_entropy = loss_fn
    try:
        return bench.timed_step(trainers[model])
    finally:
        transformer_module.linear_cross_entropy = fused_loss


def fused_rows(rows):
    return lambda h, w, y, ignore_index=-100: fused_loss(h, w, y, ignore_index, chunk_rows=rows)


losses = {"fused": fused_loss, "plain": plain_loss}
for rows in os.environ.get("AB_ROWS", "").split(","):
    if rows:
        losses[f"fused{rows}"] = fused_rows(int(rows))
variants = {(m, name): (m, fn) for m in trainers for name, fn in losses.items()}
ts: dict = {k: [] for k in variants}
for m, fn in variants.values():  # warm-up
    step(m, fn)
end = time.perf_counter() + seconds
rounds = 0
while rounds < 3 or time.perf_counter() < end:
    for k, (m, fn) in variants.items():
        ts[k].append(step(m, fn))
    rounds += 1
print(f"{dtype} grad_accum {ga}, {rounds} rounds, load {os.getloadavg()[0]:.1f}")
for m in trainers:
    p = ts[(m, "plain")]
    print(f"  {m}: plain {statistics.median(p) * 1e3:.0f} ms")
    for name in losses:
        f = ts[(m, name)]
        paired = statistics.median(a / b for a, b in zip(f, p))
        print(f"    {name} {statistics.median(f) * 1e3:.0f} ms, /plain paired {paired:.3f}")
ratio = {
    name: statistics.median(a / b for a, b in zip(ts[("dense_small", name)], ts[("mixtral_small", name)]))
    for name in losses
}
print("  MoE/dense tokens/s paired: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
