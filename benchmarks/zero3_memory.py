"""Per-rank memory of ZeRO-3 / optimizer offload against ZeRO-0: peak host memory and parameter bytes held.

    python benchmarks/zero3_memory.py [--nproc 2] [--steps 3] [--out FILE.json] [-- extra overrides]

Trains the same model a few steps in each layout (``--layouts``, default ZeRO-0 and ZeRO-3) through
``python -m moetrain.train`` under torchrun, every rank reporting (through this file, used as the
training entry with ``--rank-report``):
- ``peak_rss``: the rank's peak resident memory (``VmHWM``) at the end of the run: on CPU, host
  memory holds the weights, gradients, optimizer state and activations;
- ``held``: the parameter bytes the rank holds after the engine is built (and ``peak_rss_after_build``,
  the peak so far at that point)
  (``moetrain.distributed.zero3.held_parameter_bytes``: a ZeRO-3 rank's own partitions, plus the
  small parameters DeepSpeed keeps gathered), against ``plan``'s ``memory.<dtype>.per_rank.weights``
  for the same layout.
Default model: mixtral_small with 16 experts (expert-heavy: 84% of its parameters are experts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = ("model=mixtral_small", "model.num_experts=16", "data=fixture")
LAYOUTS = {
    "zero0": ("parallel.zero_stage=0",),
    "zero3": ("parallel.zero_stage=3",),
    "zero3-offload": ("parallel.zero_stage=3", "parallel.offload_optimizer=true"),
    "zero2-offload": ("parallel.zero_stage=2", "parallel.offload_optimizer=true"),
}
REPORT_ENV = "MOETRAIN_MEMORY_REPORT"


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rank_entry() -> None:
    """The training entry with a per-rank report appended to $MOETRAIN_MEMORY_REPORT."""
    import moetrain.trainer.loop as loop
    from moetrain.distributed.env import strip_launcher_args
    from moetrain.distributed.zero3 import held_parameter_bytes

    held: dict[str, int] = {}
    build = loop.Trainer._build_model

    def build_and_count(self):  # noqa: ANN001
        build(self)
        held.update(held_parameter_bytes(self.model))
        held["peak_rss_after_build"] = _vm_hwm()  # where the peak is reached: building or training

    loop.Trainer._build_model = build_and_count
    run = loop.Trainer.run

    def run_and_report(self):  # noqa: ANN001
        code = run(self)
        line = {"rank": self.env.rank, "peak_rss": _vm_hwm(), "held": held}
        with open(os.environ[REPORT_ENV], "a") as f:
            f.write(json.dumps(line) + "\n")
        return code

    loop.Trainer.run = run_and_report
    sys.argv = strip_launcher_args(sys.argv)
    from moetrain.train import main

    main()


def plan_weights(overrides: list[str], nproc: int) -> dict:
    cmd = [sys.executable, "-m", "moetrain.plan", *overrides, f"plan.dp_size={nproc}", "plan.format=json"]
    keep = [o for o in cmd if not o.startswith(("trainer.", "logging.", "hydra.", "optim."))]
    out = subprocess.run(keep, cwd=REPO, capture_output=True, text=True, check=True).stdout
    mem = json.loads(out[out.index("{") :])["memory"]
    return {d: mem[d]["per_rank"]["weights"] for d in ("fp32", "bf16") if d in mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layouts", default="zero0,zero3")
    ap.add_argument("--out", default=None)
    ap.add_argument("extra", nargs="*", help="more overrides (after --)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    results = {}
    for layout in args.layouts.split(","):
        overrides = [
            *MODEL,
            *LAYOUTS[layout],
            *args.extra,
            f"trainer.max_steps={args.steps}",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "trainer.sample_tokens=0",
            "logging.progress=false",
            "logging.wandb.mode=disabled",
        ]
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.jsonl"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.nproc}",
                __file__,
                "--rank-report",
                *overrides,
                f"hydra.run.dir={tmp}/run",
            ]
            proc = subprocess.run(
                cmd, cwd=REPO, env={**env, REPORT_ENV: str(report)}, capture_output=True, text=True
            )
            if proc.returncode != 0:
                sys.exit(f"{layout} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            ranks = [json.loads(line) for line in report.read_text().splitlines()]
        plan = plan_weights([*overrides], args.nproc)
        results[layout] = {
            "overrides": overrides,
            "ranks": sorted(ranks, key=lambda r: r["rank"]),
            "plan_weights": plan,
        }
        peak = max(r["peak_rss"] for r in ranks)
        held = max(r["held"]["total"] for r in ranks)
        print(f"{layout}: peak RSS/rank {peak / 2**20:,.0f} MiB | params held/rank {held / 2**20:,.1f} MiB "
              f"(plan fp32 {plan['fp32'] / 2**20:,.1f} MiB)", flush=True)  # fmt: skip
    if "zero0" in results:
        base = max(r["peak_rss"] for r in results["zero0"]["ranks"])
        for layout, res in results.items():
            ratio = max(r["peak_rss"] for r in res["ranks"]) / base
            print(f"{layout}: peak RSS / ZeRO-0's = {ratio:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if "--rank-report" in sys.argv:
        sys.argv.remove("--rank-report")
        rank_entry()
    else:
        main()
