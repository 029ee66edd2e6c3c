"""ZeRO-3 with moetrain's MoE layer: DeepSpeed's expert placement contract, met from the outside.

DeepSpeed 0.19.8 partitions every parameter at ZeRO-3. Its engine refuses instances of its native
``deepspeed.moe.layer.MoE`` there ("Native DeepSpeed MoE is not supported with ZeRO Stage 3") and
accepts MoE layers that are instances of ``AutoEPMoELayer``, whose expert parameters carry
``ds_zero_placement_family = "autoep_expert"`` and ``ds_zero_partition_group_name``: the engine then
partitions them over their expert-data-parallel group (``_resolve_zero3_param_placement``), averages
their gradients over the full data-parallel size (``_gradient_averaging_world_size``) and adds their
squared norm over the expert-parallel group (the global gradient norm counts every expert once).
Nothing else of ``AutoEPMoELayer`` is used: the layer keeps its own forward, router losses and
all-to-all (``distributed.expert_parallel``). ``prepare_zero3`` switches a sharded layer's DeepSpeed
base class from ``MoE`` to ``AutoEPMoELayer`` and tags its experts; see docs/EXPERT_PARALLEL.md.

Without expert parallelism no layer is an MoE instance for DeepSpeed: every parameter is
"replicated" and partitioned over all ranks, experts included (their expert-data-parallel group
is then the whole world).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moetrain.distributed.expert_parallel import EXPERT_PARAM_NAMES, ExpertParallelInfo, moe_layer_with_base
from moetrain.moe.experts import EXPERT_BIASES


def _zero3_layer_class() -> type:
    """``MoELayer`` + DeepSpeed's ZeRO-3 expert contract (``AutoEPMoELayer`` as a marker base: its
    ``__init__`` and forward are never used)."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return moe_layer_with_base(
        AutoEPMoELayer,
        "ZeRO3ExpertParallelMoELayer",
        "MoELayer sharded over ranks, its experts partitioned by ZeRO-3 over their group.",
    )


def prepare_zero3(model: nn.Module, ep: ExpertParallelInfo) -> None:
    """Make ``model`` (already through ``parallelize``) acceptable to DeepSpeed's ZeRO-3 engine."""
    if ep.enabled:
        cls = _zero3_layer_class()
        for layer in model.moe_layers:
            layer.__class__ = cls
            layer.ep_group_name = ep.group_name  # what DeepSpeed reads on an AutoEP layer
            for name in layer.experts.param_names:
                p = getattr(layer.experts, name)
                p.ds_zero_placement_family = "autoep_expert"
                p.ds_zero_partition_group_name = ep.group_name


def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its ``data`` is empty outside the forward; ``ds_tensor`` is this rank's part)."""
    return hasattr(p, "ds_id")


def held_parameter_bytes(model: nn.Module) -> dict[str, int]:
    """The parameter bytes this rank holds right now, outside a forward: a ZeRO-3 parameter's own
    partition (``ds_tensor``, padding included) plus its full copy where DeepSpeed keeps it gathered
    (``ds_persist``: small parameters below ``stage3_param_persistence_threshold``); any other
    parameter in full. Split into expert and non-expert parameters."""
    out = {"expert": 0, "non_expert": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if is_partitioned(p):
            n = p.ds_tensor.numel() * p.ds_tensor.element_size()
            if getattr(p, "ds_persist", False):
                n += p.ds_numel * p.element_size()
        else:
            n = p.numel() * p.element_size()
        kind = (
            "expert"
            if name.rsplit(".", 1)[-1] in EXPERT_PARAM_NAMES + EXPERT_BIASES and ".experts." in name
            else "non_expert"
        )
        out[kind] += n
    out["total"] = out["expert"] + out["non_expert"]
    return out


def build_partitioned(cfg: Any, env: Any, ds_config: dict[str, Any]) -> tuple[nn.Module, ExpertParallelInfo]:
    """ZeRO-3's model, partitioned as it is built: never whole on any rank.

    Built on the meta device, sharded over expert-parallel ranks, parallelized and tagged for
    DeepSpeed's expert placement (``prepare_zero3``); then each parameter in turn is allocated,
    initialised in full by ``MoETransformer.init_parameter`` (seeded per (seed, name, expert): the
    same values as the ZeRO-0 build) and partitioned over its group by ``deepspeed.zero.Init`` (its
    ``module=`` form, what DeepSpeed's engine would otherwise apply to the whole built model). Host
    memory: the partitions plus the largest parameter, not the model. The engine then sees a
    ``zero.Init`` model and keeps each parameter's group. The parameters stay fp32 until
    ``cast_partitions`` (after ``model.init_from`` is loaded, as the ZeRO-0 build casts after loading)."""
    from moetrain.distributed.expert_parallel import parallelize, shard_experts
    from moetrain.model import MoETransformer

    seed = torch.initial_seed()
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    model._init_seed = seed
    ep_size = cfg.parallel.ep_size
    if ep_size > 1:  # DeepSpeed's expert groups are consecutive ranks: the expert-parallel rank is rank % ep
        shard_experts(model, env.rank % ep_size, ep_size)
    ep = parallelize(model, cfg, env)
    prepare_zero3(model, ep)
    _materialize_partitioned(model, env.device, ds_config)
    return model, ep


@torch.no_grad()
def _materialize_partitioned(model: nn.Module, device: torch.device, ds_config: dict[str, Any]) -> None:
    import deepspeed
    from deepspeed.utils import groups

    names = {id(p): name for name, p in model.named_parameters()}  # a tied alias: its source's name
    made: dict[int, nn.Parameter] = {}
    # Children before parents: Init(module=m) converts m's parameters recursively, so every
    # descendant's are partitioned (and skipped) by the time m's own are converted.
    for module in reversed(list(model.modules())):
        own = [(k, p) for k, p in module._parameters.items() if p is not None]
        for key, meta in own:
            if id(meta) in made:  # a tied alias: the same Parameter as its source
                module._parameters[key] = made[id(meta)]
                continue
            full = torch.empty(meta.shape, dtype=meta.dtype, device=device)
            model.init_parameter(names[id(meta)], full)
            p = nn.Parameter(full, requires_grad=meta.requires_grad)
            p.__dict__.update(meta.__dict__)  # the expert-parallel and placement tags
            if getattr(p, "ds_zero_placement_family", None) == "autoep_expert":
                p.ds_zero_partition_process_group = groups._get_expert_data_parallel_group(
                    p.ds_zero_partition_group_name
                )
            module._parameters[key] = made[id(meta)] = p
            del full
        if own:
            deepspeed.zero.Init(module=module, config_dict_or_path=ds_config, dtype=torch.float32)
        for key, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[key] = torch.empty_like(b, device=device)
    model.reset_buffers()


@torch.no_grad()
def cast_partitions(model: nn.Module, dtype: torch.dtype) -> None:
    """The partitions in the model dtype (what DeepSpeed's engine expects of a ``zero.Init`` model;
    element-wise, so the same values as casting the whole model and partitioning it)."""
    for p in model.parameters():
        if is_partitioned(p) and p.dtype != dtype:
            p.data = p.data.to(dtype)
            p.ds_tensor.data = p.ds_tensor.data.to(dtype)


class PartitionWriter:
    """A ZeRO-3 parameter as a write-only full tensor: ``copy_``, ``add_`` and ``[i]`` address the
    full shape; each rank keeps the elements of its own partition (every rank is given the same
    values, e.g. read from the same file: no communication). What ``load_pretrained`` writes into."""

    def __init__(self, param: nn.Parameter, offset: int = 0, shape: tuple[int, ...] | None = None) -> None:
        self.param, self.offset = param, offset
        self.shape = torch.Size(param.ds_shape if shape is None else shape)
        self.dtype = param.ds_tensor.dtype

    def __getitem__(self, i: int) -> PartitionWriter:
        inner = math.prod(self.shape[1:])
        return PartitionWriter(self.param, self.offset + i * inner, tuple(self.shape[1:]))

    def _local(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's slice of the partition, the matching slice of ``value`` flattened)."""
        part = self.param.ds_tensor.view(-1)
        n = part.numel()
        start = n * self.param.ds_zero_partition_rank  # its rank in the parameter's partition group
        flat = value.to(self.dtype).expand(self.shape).reshape(-1)
        lo, hi = max(start, self.offset), min(start + n, self.offset + flat.numel())
        if lo >= hi:
            return part[:0], flat[:0]
        return part[lo - start : hi - start], flat[lo - self.offset : hi - self.offset]

    def copy_(self, value: torch.Tensor) -> PartitionWriter:
        dst, src = self._local(value)
        dst.copy_(src)
        return self

    def add_(self, value: torch.Tensor) -> PartitionWriter:
        dst, src = self._local(value)
        dst.add_(src)
        return self


def writable_parameters(model: nn.Module) -> dict[str, Any]:
    """``named_parameters`` with each ZeRO-3 parameter as a ``PartitionWriter``."""
    return {n: PartitionWriter(p) if is_partitioned(p) else p for n, p in model.named_parameters()}
