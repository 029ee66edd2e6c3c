"""Expert parallelism: shard each MoE layer's experts over ``parallel.ep_size`` ranks, applied to a
built model from the outside (the model code never mentions ranks).

How DeepSpeed is made to treat our layer correctly (see docs/ARCHITECTURE.md, "Expert parallelism"):
the engine only gives expert parameters their own gradient reduction (sum over the expert-data-
parallel group, divided by the full data-parallel size) and its MoE-aware ZeRO handling when the
module *is an instance of* ``deepspeed.moe.layer.MoE``. ``parallelize`` therefore turns each sharded
layer into ``ExpertParallelMoELayer``: our ``MoELayer`` that also satisfies DeepSpeed's MoE contract
(``num_experts``, ``ep_size``, ``expert_group_name``, ``num_local_experts``, groups created through
``deepspeed.utils.groups``) and tags its expert parameters (``allreduce=False``, ``group_name``).
The all-to-all backward passes gradients unscaled, so no extra scaling is applied anywhere.

Checkpoints never use DeepSpeed's engine files (its MoE writer only understands its own expert module
names): moetrain/checkpoint/ stores every expert under its global index, each rank writing and
reading only its own (checkpoint/layout.py), which is what makes resharding possible.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.checkpoint.layout import EXPERT_PARAM_NAMES  # noqa: F401  (re-exported: zero3, tests)
from moetrain.config import TrainConfig
from moetrain.distributed.chunked_exchange import ChunkedAllToAllExchange
from moetrain.distributed.env import DistEnv
from moetrain.moe import MoELayer


@dataclass
class ExpertParallelInfo:
    enabled: bool
    ep_size: int = 1
    ep_rank: int = 0
    group: Any = None
    group_name: str = ""


class AllToAllExchange:
    """Send each token copy to the rank that owns its expert, run local experts, send results back.

    Token copies arrive sorted by global expert id, so the copies for rank r are one contiguous
    slice. Step 1 exchanges per-expert counts, step 2 the tokens (variable splits, dropless; empty
    splits are fine), then received rows are regrouped by local expert for the grouped GEMM.
    """

    def __init__(self, group: Any, ep_size: int, num_local_experts: int) -> None:
        self.group, self.ep_size, self.num_local_experts = group, ep_size, num_local_experts

    def __call__(
        self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts: nn.Module
    ) -> torch.Tensor:
        with warnings.catch_warnings():
            # torch 2.13 marks the public autograd all_to_all_single deprecated in favour of a private
            # module (_functional_collectives); we keep the public, documented one until it moves.
            warnings.simplefilter("ignore", FutureWarning)
            return self._exchange(x_SH, tokens_per_expert_E, experts)

    def _exchange(
        self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts: nn.Module
    ) -> torch.Tensor:
        from torch.distributed.nn.functional import all_to_all_single

        ep, El = self.ep_size, self.num_local_experts
        counts_send = tokens_per_expert_E.to(torch.int64)
        counts_recv = torch.empty_like(counts_send)  # [src rank, local expert] after the exchange
        dist.all_to_all_single(counts_recv, counts_send, group=self.group)
        send_splits = counts_send.view(ep, El).sum(1).tolist()
        recv_splits = counts_recv.view(ep, El).sum(1).tolist()
        x_recv = all_to_all_single(
            x_SH.new_empty(sum(recv_splits), x_SH.shape[1]),
            x_SH.contiguous(),
            output_split_sizes=recv_splits,
            input_split_sizes=send_splits,
            group=self.group,
        )
        # Rows arrive grouped by source rank, then by local expert: regroup by local expert.
        expert_of_row = torch.repeat_interleave(
            torch.arange(El, device=x_SH.device).repeat(ep), counts_recv.to(x_SH.device)
        )
        order = torch.argsort(expert_of_row, stable=True)
        y_sorted = experts(x_recv[order], counts_recv.view(ep, El).sum(0))
        y_recv = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        return all_to_all_single(
            x_SH.new_empty(sum(send_splits), y_recv.shape[1]),
            y_recv,
            output_split_sizes=send_splits,
            input_split_sizes=recv_splits,
            group=self.group,
        )


@functools.cache
def moe_layer_with_base(deepspeed_base: type, name: str, doc: str) -> type:
    """``MoELayer`` that is also an instance of ``deepspeed_base``, the class DeepSpeed's engine looks
    for (its contract); ``MoELayer`` comes first in the MRO, so ``__init__`` and forward stay ours.
    One class per base, built on first use (importing deepspeed is slow)."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, **_: Any) -> None:
        pass  # groups already exist: parallelize() created them before the engine

    return type(
        name,
        (MoELayer, deepspeed_base),
        {"set_deepspeed_parallelism": set_deepspeed_parallelism, "__doc__": doc},
    )


def _ep_layer_class() -> type:
    """``MoELayer`` + DeepSpeed's MoE contract."""
    from deepspeed.moe.layer import MoE

    return moe_layer_with_base(MoE, "ExpertParallelMoELayer", "MoELayer sharded over ranks.")


def shard_experts(model: nn.Module, ep_rank: int, ep_size: int) -> None:
    """Keep experts ``[ep_rank * E/ep, (ep_rank + 1) * E/ep)`` of every MoE layer (no communication).

    On a real model the shard is a slice of the full init (same values as one process); on a meta
    model nothing is allocated, and ``reset_parameters`` later initialises exactly that slice
    (``experts.first_expert`` tells it which global experts these are)."""
    for layer in model.moe_layers:
        El = layer.num_experts // ep_size
        with torch.no_grad():
            for name in layer.experts.param_names:  # w1, v1, w2 (+ their biases: gpt-oss)
                full = getattr(layer.experts, name)
                shard = nn.Parameter(full.data[ep_rank * El : (ep_rank + 1) * El].clone())
                setattr(layer.experts, name, shard)
        layer.experts.num_experts = El
        layer.experts.first_expert = ep_rank * El


def build_model(cfg: TrainConfig, device: torch.device, ep_rank: int = 0, ep_size: int = 1) -> nn.Module:
    """The model of one rank, built on the meta device and materialised on ``device`` with only this
    rank's experts: host and device memory follow the shard, never the whole model. Initialised as
    a full model built after ``torch.manual_seed`` would be, sliced (see ``reset_parameters``).
    Call ``parallelize`` afterwards for the process groups and the all-to-all."""
    from moetrain.model import MoETransformer

    seed = torch.initial_seed()
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    model._init_seed = seed
    if ep_size > 1:
        shard_experts(model, ep_rank, ep_size)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty made one new Parameter per module: the tied head is the embedding again
    model.reset_parameters()
    return model


def parallelize(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> ExpertParallelInfo:
    """Apply expert parallelism (and the global-batch balance group) to ``model`` in place."""
    if cfg.model.moe.aux_loss_scope == "global_batch" and env.world_size > 1:
        model.balance_group = dist.group.WORLD
    ep_size = cfg.parallel.ep_size
    if ep_size == 1:
        return ExpertParallelInfo(enabled=False)
    if env.world_size % ep_size != 0:
        raise ValueError(
            f"parallel.ep_size={ep_size} is invalid: must divide the number of processes {env.world_size}"
        )
    from deepspeed.utils import groups

    group_name = f"ep_size_{ep_size}"
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    group = groups._get_expert_parallel_group(group_name)
    ep_rank = groups._get_expert_parallel_rank(group_name)
    num_experts = cfg.model.num_experts
    El = num_experts // ep_size
    already = all(layer.experts.w1.shape[0] == El for layer in model.moe_layers)
    if not already:  # a full model: keep this rank's slice (build_model shards before allocating)
        shard_experts(model, ep_rank, ep_size)
    for layer in model.moe_layers:
        # Tagged here, after any materialisation (to_empty from meta makes new Parameter objects,
        # which would silently drop the tags: experts averaged over ranks that hold different ones).
        for param in layer.experts.parameters():  # the fused weights, and LoRA adapters if any
            param.allreduce = False  # DeepSpeed: an expert param, reduced over its expert-DP group
            param.group_name = group_name
        if getattr(layer.experts, "first_expert", 0) != ep_rank * El:
            raise ValueError(f"model was sharded for another expert-parallel rank than {ep_rank}")
        chunks = cfg.parallel.a2a_chunks
        layer.exchange = (
            ChunkedAllToAllExchange(group, ep_size, El, chunks)
            if chunks > 1
            else AllToAllExchange(group, ep_size, El)
        )
        layer.__class__ = _ep_layer_class()
        layer.ep_size, layer.expert_group_name, layer.num_local_experts = ep_size, group_name, El
        layer.enable_expert_tensor_parallelism = False
    model.has_expert_parallel_params = True
    return ExpertParallelInfo(True, ep_size, ep_rank, group, group_name)
