"""Routing analysis of a trained checkpoint: where do tokens go, and do experts specialise by domain?

    python -m moetrain.analyze CHECKPOINT [--out DIR] [--batches N] [--batch-size B]

Runs the validation split of the checkpoint's own data config through the model and writes to
``DIR`` (default ``RUN/analysis/step_N/`` for a checkpoint ``RUN/checkpoints/step_N``, outside the
checkpoint folders that ``trainer.keep_last`` prunes). Relative data paths of the training config
(``data.data_files``, ``data.data_dir``, a local ``data.name`` or ``data.tokenizer``) are resolved
against the directory training was started from (Hydra's ``RUN/.hydra/hydra.yaml``), so any
directory works:
- ``summary.json``: per MoE layer the fraction of routed tokens per expert (sums to 1), imbalance
  (max/mean), coefficient of variation, mean router entropy, drop rate (capacity mode), per-domain
  expert fractions and a specialisation score (normalised mutual information between the token's
  domain and its chosen experts: 0 = experts ignore the domain, 1 = the domain decides the expert);
- ``tokens_per_expert.png`` (layers x experts heatmap), ``domain_routing.png`` (domain x expert per
  layer), ``router_entropy.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch


def normalized_mutual_information(joint_DE: torch.Tensor) -> float:
    """NMI of a domain x expert count table, normalised by min(H(domain), H(expert)) to [0, 1]."""
    p = joint_DE.double() / joint_DE.sum().clamp_min(1)
    pd, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pd @ pe)[nz]).log()).sum())

    def entropy(q: torch.Tensor) -> float:
        q = q[q > 0]
        return float(-(q * q.log()).sum())

    denom = min(entropy(pd.flatten()), entropy(pe.flatten()))
    return max(0.0, min(1.0, mi / denom)) if denom > 0 else 0.0


@torch.no_grad()
def collect_routing(model: Any, batches: list[dict[str, torch.Tensor]], num_domains: int) -> dict[str, Any]:
    """Per MoE layer: counts [E], domain x expert counts [D, E], entropy sum, tokens, drops."""
    layers = model.moe_layers
    E = model.cfg.num_experts
    counts = torch.zeros(len(layers), E, dtype=torch.float64)
    by_domain = torch.zeros(len(layers), max(num_domains, 1), E, dtype=torch.float64)
    entropy = torch.zeros(len(layers), dtype=torch.float64)
    dropped = torch.zeros(len(layers), dtype=torch.float64)
    current: dict[str, torch.Tensor] = {}
    hooks = []
    for li, layer in enumerate(layers):

        def hook(_mod, _inp, routing, li=li):
            ids = routing.expert_ids_NK
            dom = current["domain_N"].repeat_interleave(ids.shape[1])
            flat = ids.reshape(-1)
            counts[li] += torch.bincount(flat, minlength=E).double()
            by_domain[li].index_put_((dom, flat), torch.ones_like(flat, dtype=torch.float64), accumulate=True)
            probs = routing.probs_NE
            entropy[li] += float(-(probs * probs.clamp_min(1e-20).log()).sum())

        hooks.append(layer.router.register_forward_hook(hook))
    tokens = 0
    try:
        for batch in batches:
            ids = batch["input_ids"]
            B, T = ids.shape
            current["domain_N"] = batch["domain"].clamp_min(0).repeat_interleave(T)
            out = model(ids)
            for li, s in enumerate(out.router_stats):
                dropped[li] += s.num_dropped
            tokens += B * T
    finally:
        for h in hooks:
            h.remove()
    return {
        "counts": counts,
        "by_domain": by_domain,
        "entropy_sum": entropy,
        "dropped": dropped,
        "tokens": tokens,
    }


def summarize(raw: dict[str, Any], layer_ids: list[int], domains: list[str], top_k: int) -> dict[str, Any]:
    layers = {}
    for li, layer in enumerate(layer_ids):
        c = raw["counts"][li]
        total = float(c.sum())
        frac = (c / max(total, 1.0)).tolist()
        dom = raw["by_domain"][li]
        per_domain = {}
        for d, name in enumerate(domains):
            row = dom[d]
            if row.sum() > 0:
                per_domain[name] = (row / row.sum()).tolist()
        layers[str(layer)] = {
            "expert_fraction": frac,
            "imbalance": float(c.max() / c.mean()) if total else None,
            "cv": float(c.std(unbiased=False) / c.mean()) if total else None,
            "entropy": float(raw["entropy_sum"][li] / max(raw["tokens"], 1)),
            "drop_rate": float(raw["dropped"][li] / max(total, 1.0)),
            "domain_expert_fraction": per_domain,
            "specialisation_nmi": normalized_mutual_information(dom) if len(per_domain) > 1 else None,
        }
    return {"tokens": raw["tokens"], "top_k": top_k, "domains": domains, "layers": layers}


def domain_routing_figure(
    summary: dict[str, Any], layer_ids: list[int], domains: list[str], num_experts: int
) -> Any:
    """Domain x expert heatmaps, one per MoE layer, on ONE colour scale (0 .. the largest fraction
    of any panel) with one colour bar, so colours compare across layers. Domain names label the
    first column only; expert ids label every panel."""
    import matplotlib.pyplot as plt

    mats = {
        layer: torch.tensor(
            [
                summary["layers"][str(layer)]["domain_expert_fraction"].get(d, [0.0] * num_experts)
                for d in domains
            ]
        )
        for layer in layer_ids
    }
    vmax = max(float(m.max()) for m in mats.values()) or 1.0
    n = len(layer_ids)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    label_width = 0.09 * max(len(d) for d in domains)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(
            label_width + 0.35 * num_experts * cols + 1.2 * cols + 1.2,
            0.9 + 0.35 * len(domains) * rows + 0.6 * rows,
        ),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for i, (ax, layer) in enumerate(zip(axes.flat, layer_ids)):
        info = summary["layers"][str(layer)]
        image = ax.imshow(mats[layer].numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=vmax)
        nmi = info["specialisation_nmi"]
        ax.set_title(f"layer {layer}" + (f"  NMI {nmi:.3f}" if nmi is not None else ""), fontsize=9)
        ax.set_yticks(range(len(domains)), domains if i % cols == 0 else [], fontsize=8)
        step = max(1, math.ceil(num_experts / 16))  # at most 16 expert labels per panel
        ax.set_xticks(range(0, num_experts, step), [str(e) for e in range(0, num_experts, step)], fontsize=7)
        if i // cols == rows - 1 or i + cols >= n:
            ax.set_xlabel("expert", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, pad=0.02)
    bar.set_label("fraction of the domain's routed tokens", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle("per-domain routing (row = domain)", fontsize=10)
    return fig


def write_plots(summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moetrain.tracking.plots import expert_heatmap

    layer_ids = [int(k) for k in summary["layers"]]
    fracs = torch.tensor([summary["layers"][str(i)]["expert_fraction"] for i in layer_ids])
    paths = []
    fig = expert_heatmap(fracs, layer_ids, title="validation tokens per expert")
    paths.append(out / "tokens_per_expert.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    domains = [
        d
        for d in summary["domains"]
        if any(d in v["domain_expert_fraction"] for v in summary["layers"].values())
    ]
    if domains:
        fig = domain_routing_figure(summary, layer_ids, domains, fracs.shape[1])
        paths.append(out / "domain_routing.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(4 + 0.3 * len(layer_ids), 3))
    ent = [summary["layers"][str(i)]["entropy"] for i in layer_ids]
    ax.bar([str(i) for i in layer_ids], ent)
    ax.axhline(math.log(fracs.shape[1]), color="gray", ls="--", label="uniform (ln E)")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean router entropy (nats)")
    ax.legend()
    paths.append(out / "router_entropy.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def default_out_dir(checkpoint_folder: Path) -> Path:
    """``RUN/analysis/step_N`` for ``RUN/checkpoints/step_N``; else ``analysis/NAME`` next to it."""
    folder = Path(checkpoint_folder)
    base = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    return base / "analysis" / folder.name


def run_dir_of(checkpoint_folder: Path) -> Path | None:
    folder = Path(checkpoint_folder).resolve()
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    return run if (run / ".hydra").is_dir() else None


def training_cwd(checkpoint_folder: Path) -> Path | None:
    """The directory training was started from, as Hydra recorded it (``hydra.runtime.cwd``)."""
    run = run_dir_of(checkpoint_folder)
    if run is None or not (run / ".hydra" / "hydra.yaml").is_file():
        return None
    import yaml

    try:
        saved = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text()) or {}
        cwd = saved["hydra"]["runtime"]["cwd"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return Path(cwd) if isinstance(cwd, str) and Path(cwd).is_absolute() else None


def resolve_data_paths(data: Any, cwd: Path | None) -> Any:
    """Make the relative local paths of a :class:`~moetrain.config.DataConfig` absolute against
    ``cwd`` (the training's working directory), so the run can be analysed from anywhere."""
    if cwd is None:
        return data
    from moetrain.config import DATA_LOADERS, DATA_SOURCES

    def fix(path: Any) -> Any:
        if isinstance(path, str) and path and "://" not in path:
            expanded = os.path.expanduser(path)
            return expanded if os.path.isabs(expanded) else str(cwd / expanded)
        if isinstance(path, list | tuple):
            return [fix(p) for p in path]
        if isinstance(path, dict):
            return {k: fix(v) for k, v in path.items()}
        return path

    def fix_if_local(name: str | None) -> str | None:  # a folder name, or a hub id: only if it exists there
        if name and not os.path.isabs(name) and (cwd / name).exists():
            return str(cwd / name)
        return name

    data.data_files = fix(data.data_files)
    if data.data_dir is not None:
        data.data_dir = fix(data.data_dir)
    if data.name not in DATA_SOURCES + DATA_LOADERS:
        data.name = fix_if_local(data.name)
    data.tokenizer = fix_if_local(data.tokenizer)
    for source in data.sources or []:  # data.name=mixture: each source's own files
        if isinstance(source, dict) and source.get("data_files") is not None:
            source["data_files"] = fix(source["data_files"])
    return data


def analyze(
    checkpoint: str, out: str | None = None, batches: int = 16, batch_size: int = 8
) -> dict[str, Any]:
    from moetrain.checkpoint import load_model
    from moetrain.config import train_config_from_dict
    from moetrain.data import ValidationLoader, build_data

    if batches < 1 or batch_size < 1:
        raise ValueError(f"--batches={batches} --batch-size={batch_size} is invalid: both must be >= 1")
    loaded = load_model(checkpoint, load_tokenizer=False)
    cfg = train_config_from_dict(loaded.config)
    resolve_data_paths(cfg.data, training_cwd(loaded.folder))
    model = loaded.model
    if not model.moe_layers:
        raise ValueError(
            f"{loaded.folder} is a dense model (model.num_experts=0): there is no routing to analyse"
        )
    data = build_data(cfg.data)
    if len(data.tokenizer) > cfg.model.vocab_size:
        raise ValueError(
            f"data.tokenizer has {len(data.tokenizer)} tokens but the model only {cfg.model.vocab_size}: "
            "the checkpoint's data config no longer reproduces its tokenizer"
        )
    # ``batches`` batches spread evenly over the split, so every domain is represented
    chosen = list(ValidationLoader(data.validation, batch_size, rank=0, world_size=1, num_batches=batches))
    raw = collect_routing(model, chosen, len(data.domains))
    summary = summarize(raw, cfg.model.moe_layer_ids, list(data.domains), cfg.model.top_k)
    summary["checkpoint"] = str(loaded.folder)
    out_dir = Path(out) if out else default_out_dir(loaded.folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary["plots"] = [p.name for p in write_plots(summary, out_dir)]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["out_dir"] = str(out_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moetrain.analyze", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint folder, a checkpoints/ folder or a run folder")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: RUN/analysis/step_N for RUN/checkpoints/step_N, which "
        "trainer.keep_last never deletes)",
    )
    p.add_argument(
        "--batches",
        type=int,
        default=16,
        help="number of validation batches to route, spread evenly over the validation split so every "
        "domain is included (default: 16; more gives steadier fractions, up to the whole split)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per batch, each data.seq_len tokens long (default: 8); "
        "batches x batch-size sequences are analysed in all",
    )
    args = p.parse_args(argv)
    try:
        s = analyze(args.checkpoint, args.out, args.batches, args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"analysed {s['tokens']} validation tokens -> {s['out_dir']}")
    for layer, info in s["layers"].items():
        nmi = info["specialisation_nmi"]
        print(
            f"  layer {layer}: imbalance {info['imbalance']:.2f}  entropy {info['entropy']:.3f}"
            + (f"  specialisation (NMI) {nmi:.3f}" if nmi is not None else "")
        )
    return 0


if __name__ == "__main__":
    from moetrain.cli import quiet_cpu_accelerator, skip_exit_collection

    skip_exit_collection()
    quiet_cpu_accelerator()
    sys.exit(main())
