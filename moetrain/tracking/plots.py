"""Matplotlib figures (Agg backend: no display needed)."""

from __future__ import annotations

from typing import Any

import torch


def expert_heatmap(counts_LE: torch.Tensor, layer_ids: list[int], title: str = "tokens per expert") -> Any:
    """Layers x experts heatmap of the fraction of routed token copies (each row sums to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frac = (counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1)).float().numpy()
    L, E = frac.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * E + 2), max(2.5, 0.4 * L + 1.5)))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L), [str(i) for i in layer_ids])
    ax.set_xticks(range(E))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of routed tokens")
    return fig
