"""Grouped-query attention with RoPE, causal (optionally sliding-window), via SDPA, with a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.layers import RMSNorm, apply_rotary
from moetrain.model.rope import Rope


@dataclass
class KVCache:
    """Keys/values of the tokens seen so far, [B, kv_heads, T, D] each (generation only)."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


def _causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask, True = attend. Queries are the last q_len positions."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attention_with_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks_N: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention whose softmax has one more logit per head, ``sinks_N[h]``, that takes probability
    mass and adds no value (gpt-oss): ``softmax([q k^T / sqrt(d), sink])[:, :-1] v``. Written out as
    transformers' eager gpt-oss attention does (SDPA has no sink); q, k, v [B, N, T, D]; ``mask``
    boolean, True = attend, broadcast to [B, N, T, kv_len] (causal / sliding-window / documents)."""
    B, N, T, D = q.shape
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks_N.to(scores.dtype).view(1, N, 1, 1).expand(B, N, T, 1)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


class Attention(nn.Module):
    """``qk_norm``: ``full`` normalises the whole q / k projection output (OLMoE), ``per_head`` each
    head over head_dim with one weight shared by the heads (Qwen3); both before RoPE.
    ``bias`` puts biases on q, k and v (Qwen2), ``out_bias`` on o (gpt-oss); ``sinks`` adds a learned
    sink logit per head to the softmax (gpt-oss, ``attention_with_sinks``)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None,
        *,
        qk_norm: str = "none",
        bias: bool = False,
        norm_eps: float = 1e-5,
        out_bias: bool = False,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None
        self.qk_norm = qk_norm
        if qk_norm == "full":
            self.q_norm = RMSNorm(num_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(num_kv_heads * head_dim, norm_eps)
        elif qk_norm == "per_head":
            self.q_norm = RMSNorm(head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim, norm_eps)

    def forward(
        self, x_BTH: torch.Tensor, rope: Rope, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask``: a boolean [B, 1, T, T] attention mask replacing the causal / sliding-window one
        (document masking, model/documents.py); not with a cache."""
        B, T, _ = x_BTH.shape
        q, k = self.q_proj(x_BTH), self.k_proj(x_BTH)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x_BTH).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        kv_len = k.shape[2]
        gqa = self.num_heads != self.num_kv_heads
        if gqa:  # expand kv heads: SDPA's enable_gqa is not implemented on every backend
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        window_active = self.sliding_window is not None and kv_len > self.sliding_window
        if self.sinks is not None:
            if mask is None:
                mask = _causal_mask(T, kv_len, self.sliding_window, x_BTH.device)
            out = attention_with_sinks(q, k, v, self.sinks, mask)
        elif mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif kv_len == T and not window_active:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = _causal_mask(T, kv_len, self.sliding_window, x_BTH.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
