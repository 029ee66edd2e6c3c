#!/usr/bin/env python
"""Compare training runs side by side from their metrics.jsonl files.

    .venv/bin/python scripts/compare_runs.py outputs/A outputs/B ... [--out compare.png]

Prints a markdown table (final and best validation loss, median tokens/s, final max imbalance and
the number of starved experts, i.e. below 10% of their fair share, per run) and, with ``--out``,
plots validation loss, training LM loss and the per-step maximum imbalance over MoE layers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: pass run directories")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def starved_experts(record: dict, threshold: float = 0.1) -> int:
    n = 0
    for key, fractions in record.items():
        if key.endswith("/expert_fraction"):
            fair = 1.0 / len(fractions)
            n += sum(f < threshold * fair for f in fractions)
    return n


def summary_row(name: str, records: list[dict]) -> str:
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    tps = statistics.median(r["tokens_per_sec"] for r in records if "tokens_per_sec" in r)  # not step 0
    last = records[-1]
    imb = last.get("moe/max_imbalance")
    return (
        f"| {name} | {last['step']} | {vals[-1]:.3f} | {min(vals):.3f} | {tps:,.0f} | "
        f"{'-' if imb is None else f'{imb:.2f}'} | {starved_experts(last)} |"
    )


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, rs in runs.items():
        ev = [r for r in rs if r.get("val_loss") is not None]
        axes[0].plot([r["step"] for r in ev], [r["val_loss"] for r in ev], marker="o", label=name)
        axes[1].plot([r["step"] for r in rs], [r["lm_loss"] for r in rs], label=name, alpha=0.8)
        if any("moe/max_imbalance" in r for r in rs):
            axes[2].plot([r["step"] for r in rs], [r.get("moe/max_imbalance") for r in rs], label=name)
    for ax, title in zip(axes, ("validation loss", "training LM loss", "max expert imbalance (max/mean)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    runs = {r.name: load(r) for r in args.runs}
    print(
        "| run | steps | final val loss | best val loss | median tokens/s | final max imbalance | starved experts |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        print(summary_row(name, rs))
    if args.out:
        plot(runs, args.out)
        print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
