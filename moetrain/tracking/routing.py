"""Routing balance and expert utilisation from the per-layer ``RouterStats`` of each forward."""

from __future__ import annotations

import torch

from moetrain.moe import RouterStats


class RoutingAccumulator:
    """Sums routed-token counts, entropy and drops per MoE layer over the micro-batches of a log window.

    The sums live on the model's device: adding a micro-batch's statistics never waits for the GPU
    (no ``.item()``/``.cpu()`` per layer); they reach the host once per log step, after the all-reduce."""

    def __init__(self, layer_ids: list[int], num_experts: int, device: torch.device | str = "cpu") -> None:
        self.layer_ids = layer_ids
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        L, E = len(self.layer_ids), self.num_experts
        self.counts_LE = torch.zeros(L, E, dtype=torch.float64, device=self.device)
        self.entropy_sum_L = torch.zeros(L, dtype=torch.float64, device=self.device)
        self.dropped_L = torch.zeros(L, dtype=torch.float64, device=self.device)
        self.forwards = 0

    def add(self, stats: list[RouterStats]) -> None:
        if not stats:
            return
        self.counts_LE += torch.stack([s.tokens_per_expert_E.detach() for s in stats]).to(
            self.device, torch.float64
        )
        self.entropy_sum_L += torch.stack([s.entropy.detach() for s in stats]).to(self.device, torch.float64)
        if any(s.num_dropped for s in stats):  # capacity mode only (dropless reports 0: no copy)
            dropped = torch.tensor([float(s.num_dropped) for s in stats], dtype=torch.float64)
            self.dropped_L += dropped.to(self.device)
        self.forwards += 1

    def packed(self) -> torch.Tensor:
        """One flat tensor to all-reduce (sum) across data-parallel ranks."""
        return torch.cat(
            [
                self.counts_LE.flatten(),
                self.entropy_sum_L,
                self.dropped_L,
                torch.tensor([float(self.forwards)], dtype=torch.float64, device=self.device),
            ]
        )

    def unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        L, E = self.counts_LE.shape
        counts = flat[: L * E].view(L, E)
        entropy = flat[L * E : L * E + L]
        dropped = flat[L * E + L : L * E + 2 * L]
        return counts, entropy, dropped, float(flat[-1])


def routing_metrics(
    layer_ids: list[int],
    counts_LE: torch.Tensor,
    entropy_sum_L: torch.Tensor,
    dropped_L: torch.Tensor,
    forwards: float,
) -> dict[str, object]:
    """Per layer: fraction of routed copies per expert (sums to 1), imbalance = max/mean load,
    coefficient of variation, mean router entropy (nats), dropped fraction (capacity mode)."""
    out: dict[str, object] = {}
    for i, layer in enumerate(layer_ids):
        counts = counts_LE[i]
        total = float(counts.sum())
        if total <= 0:
            continue
        frac = counts / total
        mean = counts.mean()
        prefix = f"moe/layer_{layer}"
        out[f"{prefix}/expert_fraction"] = [round(float(x), 6) for x in frac]
        out[f"{prefix}/imbalance"] = float(counts.max() / mean)
        out[f"{prefix}/cv"] = float(counts.std(unbiased=False) / mean)
        out[f"{prefix}/entropy"] = float(entropy_sum_L[i] / max(forwards, 1.0))
        out[f"{prefix}/dropped_fraction"] = float(dropped_L[i] / total)
    if layer_ids and counts_LE.sum() > 0:
        keys = [
            f"moe/layer_{layer}/imbalance" for layer in layer_ids if f"moe/layer_{layer}/imbalance" in out
        ]
        out["moe/max_imbalance"] = max(out[k] for k in keys)  # type: ignore[type-var]
    return out


def expert_bias_metrics(biases: dict[int, torch.Tensor]) -> dict[str, object]:
    """Aux-loss-free balancing state: per MoE layer (block index -> fp32 [E] bias) the bias as a list
    ``moe/layer_{i}/expert_bias`` next to ``expert_fraction``, plus ``expert_bias_min``, ``_max`` and
    ``_spread`` (max - min) scalars for charts."""
    out: dict[str, object] = {}
    for layer, bias in biases.items():
        b = bias.detach().float().cpu()
        prefix = f"moe/layer_{layer}"
        out[f"{prefix}/expert_bias"] = [round(float(x), 6) for x in b]
        lo, hi = float(b.min()), float(b.max())
        out[f"{prefix}/expert_bias_min"] = lo
        out[f"{prefix}/expert_bias_max"] = hi
        out[f"{prefix}/expert_bias_spread"] = hi - lo
    return out
