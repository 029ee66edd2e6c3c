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
names): the model and the optimizer state are gathered into layout-free files with all experts in
global order (``full_state_dict``, ``full_optimizer_state``) and read back shard by shard
(``read_layout_free``), which is what makes resharding possible. ``load_engine_state`` only reads
checkpoints written before that.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import TrainConfig
from moetrain.distributed.comm import gather_to_first
from moetrain.distributed.env import DistEnv
from moetrain.moe import MoELayer

EXPERT_PARAM_NAMES = ("w1", "v1", "w2")


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


def _deepspeed_moe_base() -> type:
    from deepspeed.moe.layer import MoE

    return MoE


_EP_CLASS: type | None = None


def _ep_layer_class() -> type:
    """``MoELayer`` + DeepSpeed's MoE contract (built lazily: importing deepspeed is slow)."""
    global _EP_CLASS
    if _EP_CLASS is None:

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, **_: Any) -> None:
            pass  # groups already exist: parallelize() created them before the engine

        _EP_CLASS = type(
            "ExpertParallelMoELayer",
            (MoELayer, _deepspeed_moe_base()),
            {
                "set_deepspeed_parallelism": set_deepspeed_parallelism,
                "__doc__": "MoELayer sharded over ranks.",
            },
        )
    return _EP_CLASS


def _names(layer: nn.Module) -> tuple[str, ...]:
    """The layer's per-expert parameters: w1, v1, w2 (and their biases where the experts have them)."""
    return getattr(layer.experts, "param_names", EXPERT_PARAM_NAMES)


def shard_experts(model: nn.Module, ep_rank: int, ep_size: int) -> None:
    """Keep experts ``[ep_rank * E/ep, (ep_rank + 1) * E/ep)`` of every MoE layer (no communication).

    On a real model the shard is a slice of the full init (same values as one process); on a meta
    model nothing is allocated, and ``reset_parameters`` later initialises exactly that slice
    (``experts.first_expert`` tells it which global experts these are)."""
    for layer in model.moe_layers:
        El = layer.num_experts // ep_size
        with torch.no_grad():
            for name in _names(layer):
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
        for name in _names(layer):
            param = getattr(layer.experts, name)
            param.allreduce = False  # DeepSpeed: an expert param, reduced over its expert-DP group
            param.group_name = group_name
        if getattr(layer.experts, "first_expert", 0) != ep_rank * El:
            raise ValueError(f"model was sharded for another expert-parallel rank than {ep_rank}")
        layer.exchange = AllToAllExchange(group, ep_size, El)
        layer.__class__ = _ep_layer_class()
        layer.ep_size, layer.expert_group_name, layer.num_local_experts = ep_size, group_name, El
        layer.enable_expert_tensor_parallelism = False
    model.has_expert_parallel_params = True
    return ExpertParallelInfo(True, ep_size, ep_rank, group, group_name)


def _expert_param_names(model: nn.Module) -> list[str]:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            out += [f"{name}.experts.{p}" for p in _names(module)]
    return out


def _gather_named(items, env: DistEnv, ep: ExpertParallelInfo) -> dict[str, torch.Tensor] | None:
    """``(name, is_expert, get)`` triples -> full tensors on rank 0's host (None elsewhere).

    ``get()`` is called on every rank in the same order (it may itself be collective, e.g. DeepSpeed's
    fp32 master read). Expert tensors are gathered over rank 0's expert-parallel group (the other
    groups hold replicas of the same experts) one at a time, straight to host memory: no rank ever
    holds every expert on its device, and the other ranks hold nothing extra.
    """
    in_first_group = ep.enabled and 0 in dist.get_process_group_ranks(ep.group)
    out: dict[str, torch.Tensor] | None = {} if env.rank == 0 else None
    for name, is_expert, get in items:
        t = get()
        if ep.enabled and is_expert:
            if in_first_group:
                full = gather_to_first(t, ep.group, out_device="cpu")
                if out is not None:
                    out[name] = full
        elif out is not None:
            out[name] = t.detach().to("cpu", copy=True)
    return out


def full_state_dict(
    model: nn.Module, env: DistEnv, ep: ExpertParallelInfo, master: Any = None
) -> dict[str, torch.Tensor] | None:
    """Every parameter and buffer with all experts in global order, on the host of rank 0 (None
    elsewhere). ``master(param)``, when given, supplies a parameter's value (the optimizer's fp32
    master weight) instead of the module's own copy. A tied parameter is stored once, under its
    first name (loaders re-tie ``lm_head.weight``)."""
    expert_names = set(_expert_param_names(model))
    seen: set[int] = set()
    items = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        is_param = isinstance(t, nn.Parameter)
        get = (lambda t=t: master(t)) if (master is not None and is_param) else (lambda t=t: t.detach())
        items.append((name, name in expert_names, get))
    return _gather_named(items, env, ep)


def full_optimizer_state(
    model: nn.Module, view: Any, env: DistEnv, ep: ExpertParallelInfo
) -> dict[str, torch.Tensor] | None:
    """The optimizer state of ``view`` (an ``OptimizerView``) as ``<key>/<parameter name>`` tensors
    with all experts in global order, plus ``step/<name>``, on the host of rank 0."""
    expert_names = set(_expert_param_names(model))
    keys = view.state_keys()
    items = []
    for name, p in model.named_parameters():
        for key in keys:
            items.append((f"{key}/{name}", name in expert_names, lambda p=p, key=key: view.state(p, key)))
    out = _gather_named(items, env, ep)
    if out is not None and keys:
        for name, _ in model.named_parameters():  # one tensor each: safetensors refuses shared storage
            out[f"step/{name}"] = torch.tensor(view.step_count())
    return out


def read_layout_free(path: Path, model: nn.Module, ep: ExpertParallelInfo) -> dict[str, torch.Tensor]:
    """Read a layout-free safetensors file (model or optimizer state), keeping only this rank's
    experts (``safe_open(...).get_slice``): host memory follows the shard, never the whole model.
    A key names its parameter after the last ``/`` (``exp_avg/layers.0.ffn.experts.w1``)."""
    from safetensors import safe_open

    expert_names = set(_expert_param_names(model)) if ep.enabled else set()
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            sl = f.get_slice(key)
            if key.rsplit("/", 1)[-1] in expert_names and sl.get_shape():  # (step/<name> is a scalar)
                El = sl.get_shape()[0] // ep.ep_size
                out[key] = sl[ep.ep_rank * El : (ep.ep_rank + 1) * El]
            else:
                out[key] = f.get_tensor(key)
    return out


def load_model_file_shard(model: nn.Module, path: Path, ep: ExpertParallelInfo) -> dict[str, torch.Tensor]:
    """Load a layout-free ``model.safetensors`` (this rank's experts only); returns what was read
    (full precision: a bf16 module gets rounded copies, the optimizer's fp32 masters take the file's)."""
    sd = read_layout_free(path, model, ep)
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        sd.setdefault("lm_head.weight", sd["embed.weight"])
    model.load_state_dict(sd, strict=True)
    return sd


# ---- engine state for sharded runs ----------------------------------------------------------------
def load_engine_state(engine: Any, folder: Path, rank: int) -> None:
    """Checkpoints written before 2026-11-25 by ZeRO-1/2 or bf16 runs: per-rank engine files."""
    # map_location: each rank's file holds tensors of that rank's GPU; load everything to the host
    # first (DeepSpeed and load_state_dict copy onto this rank's device).
    state = torch.load(folder / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)
    engine.module.load_state_dict(state["module"], strict=True)
    opt = engine.optimizer
    if type(opt).__module__.startswith("deepspeed.runtime.zero"):
        # ZeRO-1/2 index the list by data-parallel rank (and may merge partitions): give it every rank's.
        world = dist.get_world_size() if dist.is_initialized() else 1
        all_states = [
            state["optimizer"]
            if r == rank
            else torch.load(folder / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False)["optimizer"]
            for r in range(world)
        ]
        opt.load_state_dict(all_states, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        opt.load_state_dict(state["optimizer"])
    if state["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
