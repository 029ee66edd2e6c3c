"""Plot the JSON rows written by bench_moe_layer.py and bench_train_step.py (``--json``).

    python benchmarks/plot_bench.py benchmarks/results/layer.json benchmarks/results/train_step.json \
        --out benchmarks/results/bench.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layer_json")
    ap.add_argument("train_json", nargs="?")
    ap.add_argument("--out", default="benchmarks/results/bench.png")
    args = ap.parse_args()
    layer = json.loads(Path(args.layer_json).read_text())
    train = json.loads(Path(args.train_json).read_text()) if args.train_json else []

    order = ["small", "S1", "S2"]
    groups = sorted(
        {(r["shape"], r["dtype"]) for r in layer},
        key=lambda g: (g[1], order.index(g[0]) if g[0] in order else len(order)),
    )
    variants = [v for v in dict.fromkeys(r["variant"] for r in layer) if v != "dense"]
    fig, axes = plt.subplots(1, 2 if train else 1, figsize=(13 if train else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        ratios = [
            next((r["ratio"] for r in layer if (r["shape"], r["dtype"]) == g and r["variant"] == v), 0.0)
            for g in groups
        ]
        ax.bar([j + i * width for j in range(len(groups))], ratios, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{s}\n{d}" for s, d in groups])
    ax.set_ylabel("fwd+bwd time / dense SwiGLU of equal active FLOPs")
    ax.set_title("MoE layer vs dense twin (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    if train:
        ax2 = axes[0][1]
        labels = [f"{r['dtype']}\ngrad_accum {r['grad_accum']}" for r in train]
        ax2.bar(labels, [r["ratio"] for r in train], color="tab:green")
        for target, style in ((0.85, ":"), (0.90, "--")):
            ax2.axhline(target, color="r", ls=style, lw=0.8, label=f"target {target}")
        ax2.set_ylim(0, 1.1)
        ax2.set_ylabel("tokens/s mixtral_small / dense_small")
        ax2.set_title("Whole training step (higher is better)")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
