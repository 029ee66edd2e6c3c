"""Multi-head latent attention (DeepSeek-V2/V3, arXiv 2405.04434 section 2.1), ``model.mla``.

    q      = q_b_proj(RMSNorm(q_a_proj(x)))            (or q_proj(x) without q_lora_rank)  [N heads x (nope + rope)]
    c, k_r = kv_a_proj_with_mqa(x)                      c: the kv latent [kv_lora_rank], k_r: [rope], shared by the heads
    k_n, v = kv_b_proj(RMSNorm(c))                      [N heads x (nope + v)]
    k      = [k_n, RoPE(k_r)],  q = [q_nope, RoPE(q_rope)]
    out    = o_proj(softmax(q k^T * scale) v),  scale = (nope + rope)^-1/2 (x mscale^2 under YaRN)

Names are transformers' DeepseekV3Attention's, so weights copy 1:1; its latent norms use eps 1e-6
whatever rms_norm_eps says (as transformers builds them). ``rope_interleave``: the checkpoint's rotary
dims come in (even, odd) pairs; they are regrouped (evens, then odds) before the rotate-half RoPE,
which is transformers' ``apply_rotary_pos_emb_interleave`` exactly. The KV cache holds the expanded
keys and values (generation only; not the compressed latent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import MLAConfig, ModelConfig
from moetrain.model.attention import KVCache, _causal_mask
from moetrain.model.layers import RMSNorm, apply_rotary
from moetrain.model.rope import Rope, yarn_softmax_mscale

LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, which transformers uses for q_a / kv_a norms


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """``(nope + rope)^-1/2``, times ``mscale^2`` for a YaRN ``model.rope_scaling`` with ``mscale_all_dim``
    (DeepSeek-V3's long-context checkpoints; transformers' ``yarn_apply_mscale``)."""
    qk = cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim
    return qk**-0.5 * yarn_softmax_mscale(cfg.rope_scaling) ** 2


class MultiHeadLatentAttention(nn.Module):
    def __init__(
        self, hidden_size: int, num_heads: int, mla: MLAConfig, softmax_scale: float | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.nope, self.rope, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank, self.interleave = mla.kv_lora_rank, mla.rope_interleave
        qk = self.nope + self.rope
        self.softmax_scale = softmax_scale if softmax_scale is not None else qk**-0.5
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, mla.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, mla.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * self.v_dim, hidden_size, bias=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleave:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rotary(x, cos, sin)

    def forward(
        self, x_BTH: torch.Tensor, rope: Rope, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask``: a boolean [B, 1, T, T] mask replacing the causal one (document masking)."""
        B, T, _ = x_BTH.shape
        N = self.num_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTH)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTH)))
        q = q.view(B, T, N, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x_BTH).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, N, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        cos, sin = rope
        q_rot = self._rotate(q_rot, cos, sin)
        k_rot = self._rotate(k_rot.view(B, 1, T, self.rope), cos, sin)
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(B, N, T, self.rope)), dim=-1)
        if cache is not None:
            k, v = cache.append(k, v)
        kv_len = k.shape[2]
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        elif kv_len == T:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            mask = _causal_mask(T, kv_len, None, x_BTH.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, N * self.v_dim))
