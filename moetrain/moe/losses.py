"""Router losses, computed from the per-layer ``RouterStats``.

Load balancing (aux) loss, two documented forms (f = fraction of routed copies, P = mean router prob):
- ``switch``  (Switch Transformer / MegaBlocks): per layer ``E * sum_e f_e * P_e`` with
  ``f_e = count_e / (N * k)``, averaged over MoE layers. Perfect balance gives 1.0.
- ``mixtral`` (transformers' ``load_balancing_loss_func``): counts and probabilities pooled over
  all layers, ``E * sum_e (C_e / (L N)) * (Psum_e / (L N))``; equals k times ``switch`` for one layer.

Scope: with a process group (``aux_loss_scope=global_batch``) the counts are summed over all
data-parallel ranks first, so f is the global-batch fraction (Megatron's global aux loss); the
probabilities stay local, and data-parallel gradient averaging makes the result equal to one process
seeing the whole batch.

Sequence-wise balance loss (DeepSeek-V3 eq. 17-20, ``model.moe.seq_aux_loss_weight``): the same
``sum_e f_e P_e`` per *sequence* (computed in the layer, ``RouterStats.seq_aux_loss``), averaged over
the micro-batch's sequences and over MoE layers. It is per sequence by definition, so
``aux_loss_scope`` does not apply: data-parallel gradient averaging of equal micro-batches already
makes it the mean over the global batch's sequences. A separate weight rather than a third
``aux_loss_type`` because recipes combine it with a batch-level loss and/or the expert bias.

Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, averaged over MoE layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moetrain.moe.layer import RouterStats


def _global_counts(stats: list[RouterStats], group) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts [L, E] and token totals [L], summed over ``group`` if given."""
    counts = torch.stack([s.tokens_per_expert_E for s in stats])
    tokens = torch.tensor([float(s.num_tokens) for s in stats], device=counts.device)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        packed = torch.cat([counts.reshape(-1), tokens])
        dist.all_reduce(packed, group=group)
        counts, tokens = packed[: counts.numel()].view_as(counts), packed[counts.numel() :]
    return counts, tokens


def load_balancing_loss(
    stats: list[RouterStats], num_experts: int, top_k: int, kind: str = "switch", group=None
) -> torch.Tensor:
    if not stats:
        return torch.zeros(())
    counts_LE, tokens_L = _global_counts(stats, group)
    probs_LE = torch.stack([s.prob_sum_E / s.num_tokens for s in stats])
    if kind == "switch":
        f_LE = counts_LE / (tokens_L[:, None] * top_k)
        return (num_experts * (f_LE * probs_LE).sum(-1)).mean()
    if kind == "mixtral":
        L = len(stats)
        f_E = counts_LE.sum(0) / tokens_L.sum()
        p_E = probs_LE.sum(0) / L
        return num_experts * (f_E * p_E).sum()
    raise ValueError(f"model.moe.aux_loss_type={kind!r} is invalid: one of ('switch', 'mixtral')")


def sequence_balance_loss_mean(stats: list[RouterStats]) -> torch.Tensor:
    """Mean over MoE layers of each layer's sequence-wise balance loss (0 when not computed)."""
    losses = [s.seq_aux_loss for s in stats if s.seq_aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()


def router_z_loss(stats: list[RouterStats]) -> torch.Tensor:
    if not stats:
        return torch.zeros(())
    return torch.stack([s.z_loss for s in stats]).mean()
