"""Before/after in one process: ``parallel.compile`` (model/compile.py) on and off on the very same
trainer (model, DeepSpeed engine, data), whole training steps interleaved, mixtral_small and
dense_small. Off = ``model.compiled_blocks`` set to None, so the eager blocks run.

    python benchmarks/ab/ab_compile.py GRAD_ACCUM SECONDS [DTYPE]
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

ga, seconds = int(sys.argv[1]), float(sys.argv[2])
dtype = sys.argv[3] if len(sys.argv) > 3 else "fp32"
tmp = Path(tempfile.mkdtemp())
models = ("mixtral_small", "dense_small")
trainers = {
    m: bench.build_trainer(bench.compose(m, dtype, ga, ["parallel.compile=true"]), tmp / m) for m in models
}
compiled = {m: t.model.compiled_blocks for m, t in trainers.items()}
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def step(model: str, on: bool) -> float:
    trainers[model].model.compiled_blocks = compiled[model] if on else None
    return bench.timed_step(trainers[model])


for m in models:  # the first compiled steps compile (and recompile once for a new shape, if any)
    t0 = time.perf_counter()
    first = [step(m, True) for _ in range(3)]
    print(f"{m}: first compiled steps {[round(s, 2) for s in first]} s ({time.perf_counter() - t0:.1f} s)")
    for _ in range(2):
        step(m, False)

times: dict[tuple[str, bool], list[float]] = {(m, on): [] for m in models for on in (False, True)}
ratios: dict[str, list[float]] = {m: [] for m in models}
start, rounds = time.perf_counter(), 0
while time.perf_counter() - start < seconds or rounds < 5:
    for m in models:
        order = (False, True) if rounds % 2 == 0 else (True, False)
        got = {on: step(m, on) for on in order}
        for on, s in got.items():
            times[(m, on)].append(s)
        ratios[m].append(got[True] / got[False])
    rounds += 1

print(f"dtype {dtype}, grad_accum {ga}, {rounds} rounds, threads {torch.get_num_threads()}")
for m in models:
    eager, comp = statistics.median(times[(m, False)]), statistics.median(times[(m, True)])
    q = statistics.quantiles(ratios[m], n=4)
    print(
        f"{m}: eager {eager * 1000:.0f} ms, compiled {comp * 1000:.0f} ms per step; compiled / eager paired "
        f"median {statistics.median(ratios[m]):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})"
    )
for on in (False, True):
    moe, dense = (
        statistics.median(times[("mixtral_small", on)]),
        statistics.median(times[("dense_small", on)]),
    )
    print(f"{'compiled' if on else 'eager'}: MoE / dense tokens/s {dense / moe:.3f}")
