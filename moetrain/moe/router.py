"""Token-choice top-k router (Mixtral semantics): linear gate -> softmax over all experts -> top-k."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """What the router decided for N tokens."""

    weights_NK: torch.Tensor  # combine weights of the chosen experts (input dtype)
    expert_ids_NK: torch.Tensor  # int64 expert ids, global numbering
    probs_NE: torch.Tensor  # fp32 softmax over all experts (for the balance loss and entropy)
    logits_NE: torch.Tensor  # fp32 router logits (for the z-loss)


class TopKRouter(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        normalize_top_k: bool = True,
        jitter_eps: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.normalize_top_k, self.jitter_eps = normalize_top_k, jitter_eps
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, x_NH: torch.Tensor) -> Routing:
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x_NH).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x_NH = x_NH * noise
        logits_NE = self.gate(x_NH).float()
        probs_NE = F.softmax(logits_NE, dim=-1)
        weights_NK, expert_ids_NK = torch.topk(probs_NE, self.top_k, dim=-1)
        if self.normalize_top_k:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return Routing(weights_NK.to(x_NH.dtype), expert_ids_NK, probs_NE, logits_NE)
