"""The sparse FFN block: router -> dispatch -> (token exchange) -> experts -> combine.

Each piece is replaceable: expert parallelism swaps ``exchange`` for an all-to-all (see
``moetrain.distributed.expert_parallel``); the MegaBlocks backend (``model.moe.backend``, see
``moe/megablocks_backend.py``) swaps the permutation and expert kernels while reading the same
parameters. The router and the loss statistics never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moetrain.config import ConfigError, MoEConfig
from moetrain.model.layers import SwiGLU
from moetrain.moe.backends import resolve_backend
from moetrain.moe.dispatch import combine, gather_copies, plan_dispatch
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.router import TopKRouter


@dataclass
class RouterStats:
    """What one MoE layer reports per forward: differentiable loss terms plus detached statistics."""

    tokens_per_expert_E: torch.Tensor  # routed copies per (global) expert, float, detached
    prob_sum_E: torch.Tensor  # sum over tokens of router probabilities (differentiable, fp32)
    num_tokens: int
    z_loss: torch.Tensor  # mean over tokens of logsumexp(logits)^2 (differentiable)
    entropy: torch.Tensor  # mean router entropy in nats (detached)
    num_dropped: int  # capacity mode only
    # DeepSeek-V3 sequence-wise balance loss of this layer (differentiable), only when
    # model.moe.seq_aux_loss_weight > 0: mean over sequences of sum_e f_e * P_e, with per sequence
    # f_e = E / (k T) * count_e (selected copies, before capacity drops) and P_e = mean over its T
    # tokens of the normalised scores. Perfect balance in every sequence gives 1.0.
    seq_aux_loss: torch.Tensor | None = None


def sequence_balance_loss(
    probs_NE: torch.Tensor, expert_ids_NK: torch.Tensor, B: int, T: int
) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20 without alpha: ``mean_b sum_e f_be * P_be``, ``f_be = E / (k T) * count_be``,
    ``P_be = mean_t probs[b, t, e]`` (probs normalised over experts; tokens in order ``b * T + t``)."""
    E, K = probs_NE.shape[-1], expert_ids_NK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=probs_NE.dtype, device=probs_NE.device)
    ones = torch.ones(B, T * K, dtype=probs_NE.dtype, device=probs_NE.device)
    counts_BE.scatter_add_(1, expert_ids_NK.reshape(B, T * K), ones)
    f_BE = counts_BE * (E / (K * T))
    P_BE = probs_NE.reshape(B, T, E).mean(dim=1)
    return (f_BE * P_BE).sum(-1).mean()


class LocalExchange:
    """No expert parallelism: all experts live here, so the 'exchange' is a direct call."""

    def __call__(
        self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts: nn.Module
    ) -> torch.Tensor:
        return experts(x_SH, tokens_per_expert_E)


class MoELayer(nn.Module):
    """``shared_expert_size`` > 0 adds a dense SwiGLU that every token goes through (Qwen2-MoE), scaled
    by ``sigmoid(x w_g)`` with ``shared_expert_gate``. It is an ordinary replicated parameter under
    expert parallelism: only the routed experts are sharded."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        cfg: MoEConfig,
        *,
        shared_expert_size: int = 0,
        shared_expert_gate: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = cfg.capacity_factor
        self.router = TopKRouter(hidden_size, num_experts, top_k, cfg)
        self.seq_aux_loss = cfg.seq_aux_loss_weight > 0
        # A one-line ConfigError here, at model construction, when megablocks was asked for but can't run.
        self.moe_backend = resolve_backend(cfg.backend)
        gpt_oss_experts = cfg.expert_proj_bias or cfg.expert_activation != "swiglu"
        if self.moe_backend == "megablocks" and gpt_oss_experts:
            if cfg.backend == "megablocks":
                raise ConfigError(
                    "model.moe.backend=megablocks runs plain SwiGLU experts without biases; this model has "
                    "model.moe.expert_proj_bias / expert_activation=clamped_swiglu: use backend=torch or auto"
                )
            self.moe_backend = "torch"
        if self.moe_backend == "megablocks":  # same parameters and names: checkpoints are backend-free
            from moetrain.moe.megablocks_backend import MegaBlocksExperts

            self.experts = MegaBlocksExperts(num_experts, hidden_size, ffn_hidden_size, cfg.expert_impl)
        else:
            self.experts = GroupedExperts(
                num_experts,
                hidden_size,
                ffn_hidden_size,
                cfg.expert_impl,
                bias=cfg.expert_proj_bias,
                activation=cfg.expert_activation,
                alpha=cfg.swiglu_alpha,
                limit=cfg.swiglu_limit,
            )
        self.exchange = LocalExchange()
        self.shared_expert = SwiGLU(hidden_size, shared_expert_size) if shared_expert_size else None
        self.shared_expert_gate = (
            nn.Linear(hidden_size, 1, bias=False) if shared_expert_size and shared_expert_gate else None
        )

    def _add_shared(self, out_NH: torch.Tensor, x_NH: torch.Tensor) -> torch.Tensor:
        if self.shared_expert is None:
            return out_NH
        shared_NH = self.shared_expert(x_NH)
        if self.shared_expert_gate is not None:
            shared_NH = torch.sigmoid(self.shared_expert_gate(x_NH)) * shared_NH
        return out_NH + shared_NH

    def forward(self, x_BTH: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, H = x_BTH.shape
        x_NH = x_BTH.reshape(B * T, H)
        routing = self.router(x_NH)
        if self.moe_backend == "megablocks" and self.capacity_factor is None and x_NH.is_cuda:
            out_NH, routed_E = self.megablocks_dropless(x_NH, routing.expert_ids_NK, routing.weights_NK)
            out_NH = self._add_shared(out_NH, x_NH)
            return out_NH.view(B, T, H), self._with_seq_loss(self._stats(routing, routed_E, 0), routing, B, T)
        plan = plan_dispatch(
            routing.expert_ids_NK, self.num_experts, self.capacity_factor, self._plan_row_block(x_NH)
        )
        x_SH = gather_copies(x_NH, plan)
        y_SH = self.run_experts(x_SH, plan.tokens_per_expert_E)
        out_NH = self._add_shared(combine(y_SH, plan, routing.weights_NK, B * T), x_NH)
        stats = self._stats(routing, plan.routed_per_expert_E, plan.num_dropped)
        return out_NH.view(B, T, H), self._with_seq_loss(stats, routing, B, T)

    # Methods that stay eager when the block is compiled (parallel.compile, model/compile.py wraps
    # them in torch.compiler.disable): inductor adds nothing to the experts' GEMMs, torch 2.13 has no
    # fake kernel for fp32 grouped_mm on CPU, the all-to-all reads its split sizes on the host, and
    # MegaBlocks' kernels are CUDA extension ops.
    EAGER_UNDER_COMPILE = ("run_experts", "megablocks_dropless")

    def run_experts(self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """The token exchange (a direct call, or the all-to-all under expert parallelism) and the experts."""
        return self.exchange(x_SH, tokens_per_expert_E, self.experts)

    def megablocks_dropless(
        self, x_NH: torch.Tensor, expert_ids_NK: torch.Tensor, weights_NK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MegaBlocks' permutation and grouped GEMM (CUDA); returns the output and routed counts."""
        from moetrain.moe.megablocks_backend import dropless_forward

        return dropless_forward(
            x_NH, expert_ids_NK, weights_NK, self.num_experts, self.exchange, self.experts
        )

    def _plan_row_block(self, x_NH: torch.Tensor) -> int:
        """Pad the experts' row blocks in the dispatch plan (no pass of its own) when the experts are
        local. Under expert parallelism the all-to-all would carry the padding and regroup it by
        source rank, so the experts pad after the exchange instead."""
        if isinstance(self.exchange, LocalExchange) and isinstance(self.experts, GroupedExperts):
            return self.experts.resolved_row_block(x_NH.device, x_NH.dtype)
        return 1

    def _with_seq_loss(self, stats: RouterStats, routing, B: int, T: int) -> RouterStats:
        if self.seq_aux_loss:
            stats.seq_aux_loss = sequence_balance_loss(routing.probs_NE, routing.expert_ids_NK, B, T)
        return stats

    @staticmethod
    def _stats(routing, routed_E: torch.Tensor, num_dropped: int) -> RouterStats:
        probs = routing.probs_NE
        return RouterStats(
            tokens_per_expert_E=routed_E.detach().float(),
            prob_sum_E=probs.sum(0),
            num_tokens=probs.shape[0],
            z_loss=routing.logsumexp_N.pow(2).mean(),
            entropy=routing.entropy,
            num_dropped=num_dropped,
        )
