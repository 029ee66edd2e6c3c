"""Small building blocks: RMSNorm, applying rotary embeddings (tables: model/rope.py), the dense SwiGLU FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.rope import RotaryEmbedding

__all__ = ["RMSNorm", "RotaryEmbedding", "SwiGLU", "apply_rotary"]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back before the weight (as transformers' Mixtral does)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BNTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotates the first ``cos_TD.shape[-1]`` dims of each head; the rest pass (partial RoPE, GLM-4.5)."""
    r = cos_TD.shape[-1]
    if r < x_BNTD.shape[-1]:
        rot, rest = x_BNTD[..., :r], x_BNTD[..., r:]
        return torch.cat((rot * cos_TD + _rotate_half(rot) * sin_TD, rest), dim=-1)
    return x_BNTD * cos_TD + _rotate_half(x_BNTD) * sin_TD


class SwiGLU(nn.Module):
    """Dense FFN: w2(silu(w1 x) * w3 x). Names match transformers' Mixtral expert (w1/w3/w2)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
