"""The optimizer's whole state in a layout-free form, for every ZeRO stage and dtype.

What a checkpoint needs from the optimizer is, per parameter name, the fp32 master weight and the
optimizer's per-element state (AdamW: ``exp_avg``, ``exp_avg_sq``) plus its step count, with all
experts in global order. Stored that way, one copy of each, a checkpoint resumes exactly at the same
layout *and* at another ``ep_size`` / world size, and DeepSpeed's per-rank engine files (a second copy
of weights and state) are not written at all.

Where that state lives depends on the engine:
- ZeRO-0 fp32: a plain torch optimizer; the module's parameters are the master weights.
- ZeRO-3 (offloaded or not): fp32 partitions per parameter group; checkpoint/zero3_state.py.
- ZeRO-1/2 (any dtype) and bf16 at ZeRO-0: DeepSpeed keeps flat fp32 partitions per param group and
  links every module parameter to its fragment (``param._hp_mapping``); ``safe_get_full_*`` /
  ``safe_set_full_*`` read and write a parameter's full fp32 value through those links (reading is
  an all-reduce over the parameter's data-parallel group, so it is collective).
:class:`OptimizerView` hides the difference. Files: the master weights go into ``model.safetensors``
(fp32, so a bf16 run resumes from its fp32 masters, not from bf16 copies), the rest into
``optimizer.safetensors`` as ``<state key>/<parameter name>``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moetrain.checkpoint import zero3_state
from moetrain.distributed.deepspeed_patches import relink_optimizer_state_fragments

FILE = "optimizer.safetensors"


class OptimizerView:
    """Per-parameter, full-tensor access to a DeepSpeed engine's fp32 master weights and optimizer state.

    Four kinds of holder: ``plain`` (ZeRO-0 fp32: the torch optimizer, the parameters are the
    masters), ``fragments`` (ZeRO-1/2 and DeepSpeed's BF16_Optimizer: flat fp32 partitions reached
    through ``param._hp_mapping``) and ``paired`` (bf16 at ZeRO-0 in DeepSpeed 0.19:
    FP16_UnfusedOptimizer, one fp32 copy per parameter in ``fp32_groups``); and ``zero3`` (ZeRO-3,
    partitioned parameters: ``checkpoint/zero3_state.py``)."""

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        self.model = model
        self.optimizer = optimizer
        self._masters: dict[int, torch.Tensor] = {}
        if not type(optimizer).__module__.startswith("deepspeed"):
            self.kind, self.base = "plain", optimizer
        elif zero3_state.is_zero3_optimizer(optimizer):
            self.kind, self.base = "zero3", optimizer.optimizer
        elif hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.kind, self.base = "fragments", optimizer.optimizer
            if self.base.state:
                self._relink()
        elif hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
            self.kind, self.base = "paired", optimizer.optimizer
            for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True):
                self._masters.update({id(lp): hp for lp, hp in zip(low, high, strict=True)})
        else:
            raise TypeError(
                f"checkpointing does not know DeepSpeed's {type(optimizer).__name__}; "
                "fix: use parallel.zero_stage 0, 1, 2 or 3 with the default optimizer settings"
            )

    @property
    def gathers(self) -> bool:
        """``master`` / ``state`` return a fresh full tensor gathered from the partitions (ZeRO-1/2/3),
        not a view of a live one: a piece kept of it must be copied, or it keeps the whole alive."""
        return self.kind in ("zero3", "fragments")

    def _relink(self) -> None:
        relink_optimizer_state_fragments(self.optimizer)  # a DeepSpeed workaround (why: that module)

    def _holder(self, p: nn.Parameter) -> torch.Tensor:
        """The tensor the torch optimizer keys its state by (plain and paired kinds)."""
        return self._masters[id(p)] if self.kind == "paired" else p

    # ---- reading (collective for the fragments kind) ---------------------------------------------------
    def master(self, p: nn.Parameter) -> torch.Tensor:
        if self.kind == "zero3":
            return zero3_state.get_master(p)
        if self.kind == "fragments":
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(p)
        return self._holder(p).detach()

    def state_keys(self) -> list[str]:
        """The per-element state keys (e.g. exp_avg, exp_avg_sq); [] before the first step."""
        for st in self.base.state.values():
            return sorted(k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)
        return []

    def state(self, p: nn.Parameter, key: str) -> torch.Tensor:
        if self.kind == "zero3":
            return zero3_state.get_state(p, key)
        if self.kind == "fragments":
            from deepspeed.utils import safe_get_full_optimizer_state

            return safe_get_full_optimizer_state(p, key)
        return self.base.state[self._holder(p)][key].detach()

    def step_count(self) -> float:
        for st in self.base.state.values():
            return float(st["step"])
        return 0.0

    # ---- writing (local: each rank writes its own fragment) --------------------------------------------
    def prepare_state(self, keys: list[str], step: float) -> None:
        """Create zeroed optimizer state (as the optimizer's first step would) so it can be filled."""
        if self.kind == "zero3":
            zero3_state.prepare_state(self.optimizer, keys, step)
            return
        for group in self.base.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for t in group["params"]:
                st: dict[str, Any] = {
                    k: torch.zeros_like(t, memory_format=torch.preserve_format) for k in keys
                }
                st["step"] = torch.tensor(step, dtype=torch.float32, device=t.device if on_device else "cpu")
                self.base.state[t] = st
        if self.kind == "fragments":  # link every parameter's fragment to the new flat state
            self._relink()

    @torch.no_grad()
    def set_master(self, p: nn.Parameter, value: torch.Tensor) -> None:
        if self.kind == "zero3":
            zero3_state.set_master(p, value)
        elif self.kind == "fragments":
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(p, value.to(device=p.device, dtype=torch.float32))
        elif self.kind == "paired":
            self._masters[id(p)].copy_(value)
        # plain: the master is the parameter, loaded with the module already

    @torch.no_grad()
    def set_state(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
        if self.kind == "zero3":
            zero3_state.set_state(p, key, value)
        elif self.kind == "fragments":
            from deepspeed.utils import safe_set_full_optimizer_state

            safe_set_full_optimizer_state(p, value.to(device=p.device, dtype=torch.float32), key)
        else:
            self.base.state[self._holder(p)][key].copy_(value)
