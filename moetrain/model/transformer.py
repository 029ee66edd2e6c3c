"""Mixtral-style decoder: embed -> N x [RMSNorm -> GQA+RoPE -> +res; RMSNorm -> FFN -> +res] -> RMSNorm -> head.

Any block's FFN is dense SwiGLU or an MoE layer (``ModelConfig.is_moe_layer``), so a dense baseline
and interleaved MoE are configs, not code. The forward returns the LM loss and the router losses
separately; ``loss`` is their weighted sum (the weights live in ``model.moe``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetrain.config import ModelConfig
from moetrain.model.attention import Attention, KVCache
from moetrain.model.documents import document_mask, document_positions
from moetrain.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from moetrain.model.lm_loss import LMHead
from moetrain.model.mla import MultiHeadLatentAttention, mla_softmax_scale
from moetrain.model.rope import Rope
from moetrain.moe import (
    MoELayer,
    RouterStats,
    load_balancing_loss,
    router_z_loss,
    sequence_balance_loss_mean,
)


@dataclass
class ModelOutput:
    # [B, T, V]; None when labels were given (the loss is fused with the head, no logits exist) unless
    # the forward was asked for them with return_logits=True.
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None  # lm_loss + aux_w * aux_loss + z_w * z_loss (+ seq_w * seq_aux_loss)
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # unweighted
    z_loss: torch.Tensor | None = None  # unweighted
    seq_aux_loss: torch.Tensor | None = None  # unweighted; only with model.moe.seq_aux_loss_weight > 0
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer, in order


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.window = cfg.layer_window(layer_idx)  # None: full causal attention
        self.attention: nn.Module
        if cfg.mla.enabled:  # multi-head latent attention (DeepSeek-V3)
            self.attention = MultiHeadLatentAttention(
                cfg.hidden_size, cfg.num_heads, cfg.mla, softmax_scale=mla_softmax_scale(cfg)
            )
        else:
            self.attention = self._gqa(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.ffn: nn.Module = MoELayer(
                cfg.hidden_size,
                cfg.ffn_hidden_size,
                cfg.num_experts,
                cfg.top_k,
                cfg.moe,
                shared_expert_size=cfg.shared_expert_intermediate_size,
                shared_expert_gate=cfg.shared_expert_gate,
            )
        else:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.dense_ffn_size)

    @staticmethod
    def _gqa(cfg: ModelConfig, layer_idx: int) -> Attention:
        return Attention(
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_size,
            cfg.layer_window(layer_idx),
            qk_norm=cfg.qk_norm,
            bias=cfg.attention_bias,
            norm_eps=cfg.norm_eps,
            out_bias=cfg.attention_out_bias,
            sinks=cfg.attention_sinks,
        )

    def forward(
        self, x: torch.Tensor, rope: Rope, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RouterStats | None]:
        x = x + self.attention(self.attention_norm(x), rope, cache, mask)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, stats = self.ffn(h)
            return x + y, stats
        return x + self.ffn(h), None


def _seed(base: int, name: str, index: int = -1) -> int:
    digest = hashlib.blake2b(f"{base}/{name}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _normal(shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    return torch.empty(shape).normal_(0.0, std, generator=torch.Generator().manual_seed(seed))


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """alias name -> source name of ``model``'s tied parameters (``MoETransformer.tied_weights``; {} for
    a model without ties). Checkpoints store only the sources; loaders restore the aliases."""
    model = getattr(model, "module", model)  # a DeepSpeed engine
    return dict(getattr(model, "tied_weights", None) or {})


def declared_ties(cfg: ModelConfig) -> dict[str, str]:
    """The ``tied_weights`` a model of ``cfg`` declares (built on the meta device: costs nothing)."""
    with torch.device("meta"):
        return tied_aliases(MoETransformer(cfg))


def drop_aliases(state: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """``state`` without the alias keys of ``tied`` (what a checkpoint or export file stores)."""
    return {k: v for k, v in state.items() if k not in tied}


def untied_in_state(state: dict[str, torch.Tensor], tied: dict[str, str]) -> list[str]:
    """Aliases that ``state`` holds as a tensor of their own, different from their source: a file
    written while the tie was broken (moetrain before 2026-12-05 lost it in the meta-device build)."""
    return [a for a, s in tied.items() if a in state and s in state and not torch.equal(state[a], state[s])]


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Tied parameters, declared once: alias name -> source name. Every path that makes or replaces
        # parameters (meta build + to_empty, loading, export) calls tie_weights(), which makes the alias
        # the *same* Parameter object as its source: named_parameters() yields it once (one optimizer
        # entry, gradients from both uses summed), and files store it once, under the source name.
        self.tied_weights: dict[str, str] = {"lm_head.weight": "embed.weight"} if cfg.tie_embeddings else {}
        self.tie_weights()
        # RoPE on cfg.rotary_dim dims of each head (partial RoPE: GLM-4.5; MLA: its rotated part).
        self.rope = RotaryEmbedding(cfg.rotary_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.activation_checkpointing = False
        # parallel.compile: torch.compile'd callables over self.layers (model/compile.py); a plain
        # list, not modules, so names and state dicts do not change. Used without a KV cache only.
        self.compiled_blocks: list[nn.Module] | None = None
        # Set by moetrain.distributed when aux_loss_scope=global_batch: balance stats span all ranks.
        self.balance_group = None
        self._init_seed = torch.initial_seed()  # set by the caller's torch.manual_seed
        # Aux-loss-free balancing: routed-token counts [L, E] of the MoE layers, summed over the
        # training forwards of the current optimizer step (plain tensor: not state, never saved;
        # empty after every update). See after_optimizer_step.
        self._bias_counts_LE: torch.Tensor | None = None
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Make every alias of ``tied_weights`` its source's Parameter object again (``to_empty``,
        ``load_state_dict(assign=True)`` and the like make one new Parameter per module). Idempotent."""
        for alias, source in self.tied_weights.items():
            owner, _, attr = alias.rpartition(".")
            setattr(self.get_submodule(owner), attr, self.get_parameter(source))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2 * num_layers) (GPT-2);
        norm weights 1, biases 0.

        Every tensor draws from its own CPU generator, seeded from the global seed and its name, and
        every expert from its own (seed, name, global expert id): a model built on the meta device
        and sharded over expert-parallel ranks initialises exactly the slice that a full model would
        hold, on any device, one tensor at a time (host memory: the largest tensor, not the model).
        A no-op on the meta device."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        base = self._init_seed
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith((".bias", "_bias", ".sinks")):  # biases (experts' too), attention sinks
                p.zero_()
                continue
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            residual_out = ("o_proj.weight", "ffn.w2.weight", "experts.w2", "shared_expert.w2.weight")
            sigma = out_std if name.endswith(residual_out) else std
            if name.endswith(("experts.w1", "experts.v1", "experts.w2")):
                first = getattr(self.get_submodule(name.rsplit(".", 1)[0]), "first_expert", 0)
                for e in range(p.shape[0]):
                    p[e].copy_(_normal(p.shape[1:], sigma, _seed(base, name, first + e)))
            else:
                p.copy_(_normal(p.shape, sigma, _seed(base, name)))
        for layer in self.moe_layers:  # state, not parameters: starts at zero
            bias = layer.router.expert_bias
            if bias is not None and not bias.is_meta:
                bias.zero_()
        self._bias_counts_LE = None
        self.rope.reset_parameters()

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.layers if b.is_moe]

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        labels_BT: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        return_logits: bool = False,
        document_ids_BT: torch.Tensor | None = None,
    ) -> ModelOutput:
        """``document_ids_BT`` (data.document_masking): per token, its document in the packed block;
        attention then stays inside each document and positions restart (model/documents.py)."""
        B, T = input_ids_BT.shape
        start = caches[0].length if caches else 0
        x = self.embed(input_ids_BT)
        mask: dict[int | None, torch.Tensor] | None = None
        if document_ids_BT is None:
            positions = torch.arange(start, start + T, device=input_ids_BT.device)
            rope = self.rope(positions, x.dtype)
        else:
            if caches:
                raise ValueError("document_ids_BT is for training and evaluation, not with a KV cache")
            document_ids_BT = document_ids_BT.to(input_ids_BT.device)
            cos, sin = self.rope(document_positions(document_ids_BT).reshape(-1), x.dtype)
            rope = (cos.view(B, 1, T, -1), sin.view(B, 1, T, -1))  # per sequence: broadcast over heads
            # One mask per distinct window (model.layer_types mixes sliding and full layers).
            mask = {w: document_mask(document_ids_BT, w) for w in {b.window for b in self.layers}}
        stats: list[RouterStats] = []
        blocks = self.compiled_blocks if self.compiled_blocks is not None and caches is None else self.layers
        for i, block in enumerate(blocks):
            mask_i = mask[self.layers[i].window] if mask is not None else None
            if self.activation_checkpointing and self.training and caches is None:
                x, s = checkpoint(block, x, rope, None, mask_i, use_reentrant=False)
            else:
                x, s = block(x, rope, caches[i] if caches else None, mask_i)
            if s is not None:
                stats.append(s)
        if self.training and stats and self.cfg.moe.bias_update_rate > 0:
            self._count_for_bias(stats)
        h = self.norm(x)
        logits = self.lm_head(h) if labels_BT is None or return_logits else None
        out = ModelOutput(logits=logits, router_stats=stats)
        if labels_BT is not None:
            # The head and the loss in one pass over token chunks: no [B*T, V] logits (model/lm_loss.py).
            out.lm_loss = self.lm_head(
                h.reshape(-1, h.shape[-1]), labels_BT.reshape(-1), chunk_rows=self.cfg.loss_chunk_tokens
            )
            moe = self.cfg.moe
            out.aux_loss = load_balancing_loss(
                stats, self.cfg.num_experts, self.cfg.top_k, moe.aux_loss_type, self.balance_group
            ).to(out.lm_loss.device)
            out.z_loss = router_z_loss(stats).to(out.lm_loss.device)
            out.loss = out.lm_loss + moe.aux_loss_weight * out.aux_loss + moe.z_loss_weight * out.z_loss
            if moe.seq_aux_loss_weight > 0:
                out.seq_aux_loss = sequence_balance_loss_mean(stats).to(out.lm_loss.device)
                out.loss = out.loss + moe.seq_aux_loss_weight * out.seq_aux_loss
        return out

    # ---- aux-loss-free balancing (expert-selection bias) -----------------------------------------
    @torch.no_grad()
    def _count_for_bias(self, stats: list[RouterStats]) -> None:
        # Counted here, from the stats the forward returns, not inside the layer: with activation
        # checkpointing the layer's forward runs twice per micro-batch (once more in backward).
        counts = torch.stack([s.tokens_per_expert_E.detach() for s in stats]).to(torch.float64)
        self._bias_counts_LE = counts if self._bias_counts_LE is None else self._bias_counts_LE + counts

    @torch.no_grad()
    def after_optimizer_step(self, all_reduce=None) -> None:  # noqa: ANN001 (a callable)
        """Update every router's expert bias from the routed-token counts of the step just taken.

        ``all_reduce(t)`` sums ``t`` over all data-parallel ranks (the trainer passes it; one call
        for all layers), so every rank applies the same update to the same bias. Counts are float64
        (exact integers far beyond fp32's 2^24). A no-op without bias balancing or without counts."""
        counts = self._bias_counts_LE
        self._bias_counts_LE = None
        if counts is None or self.cfg.moe.bias_update_rate <= 0:
            return
        if all_reduce is not None:
            counts = all_reduce(counts)
        for layer, load_E in zip(self.moe_layers, counts, strict=True):
            layer.router.update_bias(load_E)

    def expert_biases(self) -> dict[int, torch.Tensor]:
        """Block index -> that MoE layer's expert-selection bias (fp32 [E]); empty when balancing is off."""
        return {
            i: b.ffn.router.expert_bias
            for i, b in enumerate(self.layers)
            if b.is_moe and b.ffn.router.expert_bias is not None
        }

    def routing_state_metrics(self) -> dict[str, object]:
        """Per MoE layer ``moe/layer_{i}/expert_bias`` (list) and its min / max / spread; {} when off.
        Identical on every rank (no communication)."""
        from moetrain.tracking.routing import expert_bias_metrics

        return expert_bias_metrics(self.expert_biases())

    def num_params(self, active: bool = False) -> int:
        """Total parameters, or those touched per token (top_k of the experts) with ``active``."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if not active:
            return total
        inactive = 0
        for layer in self.moe_layers:
            per_expert = sum(p[0].numel() for p in layer.experts.parameters())
            inactive += per_expert * (self.cfg.num_experts - self.cfg.top_k)
        return total - inactive
