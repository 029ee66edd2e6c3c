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
