"""Token-choice top-k router.

Scores: ``softmax`` over all experts (Mixtral) or an independent ``sigmoid`` per expert
(DeepSeek-V3). Top-k selection, then the chosen scores become the combine weights, renormalised to
sum to 1 when ``normalize_top_k`` (Mixtral; DeepSeek-V3 does the same for sigmoid scores).

Aux-loss-free balancing (DeepSeek-V3, arXiv 2412.19437, section 2.1.2): with ``bias_update_rate``
u > 0 the router holds a per-expert ``expert_bias`` b, a persistent fp32 buffer (state, not a
parameter: no gradient, no weight decay; saved in checkpoints). b is added to the scores *only to
choose* the top-k experts; the combine weights still come from the unbiased scores. After each
optimizer step ``update_bias`` nudges it by ``u * sign(mean load - load_e)`` from the routed-token
counts of the whole step over all data-parallel ranks (``MoETransformer.after_optimizer_step``),
so every rank holds the same b. ``selection_bias`` holds b without updating it (a DeepSeek-V3 / GLM-4.5
checkpoint's ``e_score_correction_bias``).

Group-limited routing (DeepSeek-V3's node-limited choice, GLM-4.5; ``n_group`` / ``topk_group``): the
experts form ``n_group`` equal groups of consecutive ids; each token keeps the ``topk_group`` groups with
the largest sum of their two best (bias-corrected) scores and chooses its top-k inside them.
``routed_scaling_factor`` multiplies the combine weights after renormalisation. Both as transformers'
DeepseekV3TopkRouter. Every step is row-wise, so a token's choice does not depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import SCORE_FUNCTIONS, MoEConfig


@dataclass
class Routing:
    """What the router decided for N tokens."""

    weights_NK: torch.Tensor  # combine weights of the chosen experts (input dtype)
    expert_ids_NK: torch.Tensor  # int64 expert ids, global numbering
    # fp32 scores normalised over all experts (rows sum to 1): the softmax, or sigmoid / its row sum
    # (DeepSeek-V3's s'). For the balance losses and the entropy metric.
    probs_NE: torch.Tensor
    logsumexp_N: torch.Tensor  # fp32 logsumexp of each token's logits (the z-loss), differentiable
    entropy: torch.Tensor  # mean over tokens of the entropy of probs_NE, nats (detached)


class TopKRouter(nn.Module):
    """Top-k expert choice over ``num_experts`` as ``model.moe`` (``cfg``, defaults when None) sets it:
    the score function, group-limited routing, the selection bias and the gate's bias."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, cfg: MoEConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or MoEConfig()
        if cfg.score_function not in SCORE_FUNCTIONS:
            raise ValueError(
                f"model.moe.score_function={cfg.score_function!r} is invalid: one of {SCORE_FUNCTIONS}"
            )
        self.num_experts, self.top_k = num_experts, top_k
        self.normalize_top_k, self.jitter_eps = cfg.normalize_top_k, cfg.jitter_eps
        self.score_function = cfg.score_function
        self.bias_update_rate = float(cfg.bias_update_rate)
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.routed_scaling_factor = float(cfg.routed_scaling_factor)
        self.gate = nn.Linear(hidden_size, num_experts, bias=cfg.router_bias)  # router_bias: gpt-oss
        self.expert_bias: torch.Tensor | None
        if self.bias_update_rate > 0 or cfg.selection_bias:
            # Full [E] on every rank (also under expert parallelism): not an expert parameter.
            self.register_buffer(
                "expert_bias", torch.zeros(num_experts, dtype=torch.float32), persistent=True
            )
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """Moves follow the module, but the bias stays fp32 under ``.to(bf16)`` / ``.half()``: steps of
        u = 1e-3 would round away in bf16 (DeepSpeed casts the module's floating buffers)."""
        before = self._buffers.get("expert_bias")
        out = super()._apply(fn, recurse)
        after = self._buffers.get("expert_bias")
        if before is not None and after is not None and after.dtype != torch.float32:
            src = after if before.is_meta else before
            self._buffers["expert_bias"] = src.to(device=after.device, dtype=torch.float32)
        return out

    def forward(self, x_NH: torch.Tensor) -> Routing:
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x_NH).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x_NH = x_NH * noise
        logits_NE = self.gate(x_NH).float()
        if self.score_function == "sigmoid":
            # In fp64, then rounded: torch's fp32 sigmoid rounds an element differently in the vector
            # body and the scalar tail of the call, so a token's scores depended on how many tokens
            # shared the call (routing flips under expert parallelism). The fp64 results of the two
            # paths differ far below fp32's rounding step; tests/moe/test_router.py checks it.
            scores_NE = torch.sigmoid(logits_NE.double()).float()
            probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
        else:
            # F.softmax, not exp(logits - logsumexp): its kernel works row by row, so a token's scores
            # do not depend on how many tokens share the call. Flat elementwise exp/sum round a row
            # differently depending on where it falls in the vector and thread chunks, and that broke
            # expert parallelism == one process (routing flips;
            # benchmarks/results/combine_router_entropy_epyc-avx512bf16_2026-12-02.md).
            scores_NE = probs_NE = F.softmax(logits_NE, dim=-1)
        logsumexp_N = torch.logsumexp(logits_NE, dim=-1)
        if self.n_group > 1:
            choice_NE = scores_NE if self.expert_bias is None else scores_NE + self.expert_bias.float()
            _, expert_ids_NK = torch.topk(self._within_best_groups(choice_NE), self.top_k, dim=-1)
            weights_NK = scores_NE.gather(-1, expert_ids_NK)
        elif self.expert_bias is None:
            weights_NK, expert_ids_NK = torch.topk(scores_NE, self.top_k, dim=-1)
        else:  # the bias chooses; the weights stay the unbiased scores
            _, expert_ids_NK = torch.topk(scores_NE + self.expert_bias.float(), self.top_k, dim=-1)
            weights_NK = scores_NE.gather(-1, expert_ids_NK)
        if self.normalize_top_k:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        if self.routed_scaling_factor != 1.0:
            weights_NK = weights_NK * self.routed_scaling_factor
        with torch.no_grad():
            if self.score_function == "sigmoid":
                entropy = -(probs_NE * probs_NE.clamp_min(1e-20).log()).sum(-1).mean()
            else:  # -sum p log p with log p = logits - lse: no log over [N, E] (4-13x cheaper at 4096 x 64)
                entropy = (logsumexp_N - (probs_NE * logits_NE).sum(-1)).mean()
        return Routing(weights_NK.to(x_NH.dtype), expert_ids_NK, probs_NE, logsumexp_N, entropy)

    def _within_best_groups(self, choice_NE: torch.Tensor) -> torch.Tensor:
        """``choice_NE`` with the experts outside each token's ``topk_group`` best groups at -inf; a
        group's score is the sum of its two best experts' scores."""
        N, E = choice_NE.shape
        grouped_NGS = choice_NE.view(N, self.n_group, E // self.n_group)
        group_scores_NG = grouped_NGS.topk(2, dim=-1)[0].sum(dim=-1)
        best_NG = torch.topk(group_scores_NG, self.topk_group, dim=-1, sorted=False)[1]
        keep_NG = torch.zeros_like(group_scores_NG, dtype=torch.bool).scatter_(1, best_NG, True)
        return grouped_NGS.masked_fill(~keep_NG[..., None], float("-inf")).view(N, E)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """``b += u * sign(mean(load) - load)`` from this step's global routed counts per expert."""
        if self.expert_bias is None:
            return
        load = load_E.to(self.expert_bias.device, torch.float64)
        delta = torch.sign(load.mean() - load) * self.bias_update_rate
        self.expert_bias.add_(delta.to(torch.float32))
