"""Every place moetrain changes a DeepSpeed object's behaviour from the outside, in one file.

Written against DeepSpeed 0.19.8 (pyproject allows >=0.19,<0.20); each patch says why, and what of
DeepSpeed it relies on. The lean bf16 step checks every attribute it relies on and otherwise leaves
DeepSpeed's own step in place (correct, only slower), never a guess. Callers:

- ``disable_shm_comm_op``: distributed/env.py, before ``deepspeed.init_distributed``;
- ``skip_single_rank_allreduce``, ``reduce_groups_of_one_per_gradient`` and ``install_lean_bf16_step``:
  trainer/engine.py, right after ``deepspeed.initialize``; ``share_fp32_zero3_masters``: trainer/engine.py,
  before it;
- ``UpdateVeto``: trainer/loop.py, once the engine is built (wraps whatever ``optimizer.step`` is then);
- ``relink_optimizer_state_fragments``: checkpoint/optimizer_state.py, before reading or after
  creating ZeRO-1/2 (and bf16) optimizer state.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def disable_shm_comm_op() -> None:
    """Keep DeepSpeed on plain gloo: its CPU shared-memory op would be JIT-compiled at the first
    initialize (``parallel.shm_comm=true`` keeps it). DeepSpeed reads ``deepspeed.ops.__compatible_ops__``
    (a module-level dict it probes lazily) to decide whether the op can be built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@functools.cache
def share_fp32_zero3_masters() -> None:
    """fp32 ZeRO-3 without offload: the fp32 weight partitions serve as their own master weights,
    as DeepSpeed 0.19.8 intends (``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions``: "we don't
    need another copy of the weights" when the partitions already are in the master dtype on the
    optimizer's device). Its check compares a tensor's ``torch.device`` with ``self.device``, the
    accelerator's device *name* (a str), which never compare equal in torch 2.13: every fp32 run kept a
    second fp32 copy of its partitions (measured: +194 MiB per rank in benchmarks/zero3_memory.py).
    During that method only, ``self.device`` is the ``torch.device`` of that name. Same values: at fp32
    the weights equal their masters after every step (the step copies masters into the weights)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    create = Stage3._create_fp32_partitions

    @functools.wraps(create)
    def create_fp32_partitions(self: Any) -> Any:
        name = self.device
        if isinstance(name, str):
            self.device = torch.device(name)
        try:
            return create(self)
        finally:
            self.device = name

    Stage3._create_fp32_partitions = create_fp32_partitions


def skip_single_rank_allreduce(engine: Any) -> None:
    """One process at ZeRO-0: DeepSpeed's gradient "all-reduce" would still flatten every gradient into
    one buffer, cast it to the fp32 communication dtype, reduce it over a group of one and copy it back:
    three passes over all gradients that change no bit. ``DeepSpeedEngine.enable_backward_allreduce`` is
    the engine's own switch for it (ZeRO-1/2 read their partitions from that path, so they keep it)."""
    engine.enable_backward_allreduce = False


def reduce_groups_of_one_per_gradient(engine: Any) -> None:
    """ZeRO-0 with ``ep_size`` equal to the number of processes: each expert's data-parallel group is
    one rank, yet DeepSpeed's "all-reduce" of the expert gradients still copies all of a rank's
    expert gradients into one new flat buffer (``allreduce_no_retain`` fills buckets of 500M
    elements), scales it by 1 / data-parallel size and copies it back. That buffer is as large as the
    rank's expert gradients (201 MB per rank for mixtral_small with 16 experts of F 2048 at ep=2) and,
    under the retaining host allocator, stays resident. For a group of one this makes every gradient
    its own bucket: DeepSpeed's own arithmetic (``allreduce_and_copy``) one tensor at a time, the same
    bits, no buffer larger than one gradient. Groups of several ranks keep their buckets (fewer
    collectives). Relies on ``allreduce_no_retain(bucket, dp_group, numel_per_bucket, dp_world_size)``
    flushing a bucket once it holds more than ``numel_per_bucket`` elements (DeepSpeed 0.19)."""
    from deepspeed import comm as dist

    bucketed = engine.allreduce_no_retain

    def per_gradient_when_alone(bucket, dp_group, numel_per_bucket=500000000, dp_world_size=None):
        if dist.get_world_size(group=dp_group) == 1:
            numel_per_bucket = 0  # flush after every gradient
        return bucketed(bucket, dp_group, numel_per_bucket=numel_per_bucket, dp_world_size=dp_world_size)

    engine.allreduce_no_retain = per_gradient_when_alone


def lean_bf16_step_applies(opt: Any) -> bool:
    """bf16 at ZeRO-0 runs DeepSpeed's FP16_UnfusedOptimizer (fp32 masters in ``fp32_groups``). Its
    step's overflow check and gradient norm repeat what the loop already did exactly before the step
    (finite loss, exact global norm, clipping: ZeRO-0 hands DeepSpeed ``gradient_clipping`` 0), and its
    unscale multiplies by 1.0 (bf16 has no loss scale): three passes over the gradients, dropped here."""
    # Any attribute missing (another DeepSpeed version) means DeepSpeed's own step: never a guess.
    scale = getattr(opt, "loss_scale_config", None)
    return (
        type(opt).__name__ == "FP16_UnfusedOptimizer"
        and all(hasattr(opt, a) for a in ("fp16_groups", "fp32_groups", "optimizer", "_update_scale"))
        and getattr(scale, "use_grad_scaling", True) is False
        and getattr(scale, "cur_scale", None) == 1.0
        and getattr(opt, "clip_grad", 1.0) == 0
        and getattr(opt, "fused_lamb_legacy", True) is False
        and getattr(opt, "custom_loss_scaler", True) is False
    )


def lean_bf16_step(opt: Any, closure: Any = None) -> bool:
    """FP16_UnfusedOptimizer.step minus what changes no bit here (``lean_bf16_step_applies``): bf16
    gradients -> fp32 masters, the torch optimizer's step, fp32 masters -> bf16 weights. The result is
    bit-identical to DeepSpeed's step; a non-finite step never gets here (the loop's update veto)."""
    for masters, weights in zip(opt.fp32_groups, opt.fp16_groups):
        for hp, lp in zip(masters, weights):
            # Like DeepSpeed: a parameter without a gradient still steps (zero grad: moments decay).
            hp.grad = torch.zeros_like(hp) if lp.grad is None else lp.grad.to(hp.dtype)
    opt.optimizer.step()
    for masters, weights in zip(opt.fp32_groups, opt.fp16_groups):
        for hp in masters:
            hp.grad = None
        if weights:
            torch._foreach_copy_([lp.data for lp in weights], masters)
    opt._update_scale(False)  # DeepSpeed's iteration count (saved in its state_dict)
    opt.overflow = False
    return False


def install_lean_bf16_step(opt: Any) -> bool:
    """Replace ``opt.step`` by ``lean_bf16_step`` where it applies; True when it did."""
    if not lean_bf16_step_applies(opt):
        return False
    opt.step = functools.partial(lean_bf16_step, opt)
    return True


def relink_optimizer_state_fragments(opt: Any) -> None:
    """ZeRO-1/2 and bf16 optimizers link each parameter's fragment to the flat optimizer state once,
    right after the first param group's first step (``_lazy_init_hp_params_optimizer_state`` guarded
    by ``_hp_optimizer_states_linked``): groups stepped later (no-decay, expert groups) stay unlinked
    ("exp_avg not found in optimizer state fragment"). Link again now that all exist."""
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


class UpdateVeto:
    """Lets the loop veto one optimizer update (a non-finite step) through DeepSpeed's own skip path:
    with ``skip = True`` the wrapped ``optimizer.step`` reports ``overflow`` instead of stepping, and the
    engine then counts a skipped step (``engine._step_applied`` False), zeroes the gradients and leaves
    the weights and the optimizer state untouched. Relies on DeepSpeed's optimizers reading
    ``overflow`` after ``step()`` (FP16_UnfusedOptimizer, FP16_Optimizer, ZeRO-1/2/3) and on ZeRO-1/2
    keeping reduced partitions in ``averaged_gradients`` (cleared here, as its own overflow path does)."""

    def __init__(self, opt: Any) -> None:
        self.skip = False
        real_step = opt.step

        @functools.wraps(real_step)  # keeps torch's LR-scheduler marker (no "step() overridden" warning)
        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if not self.skip:
                if not hasattr(opt, "check_grad_overflow"):  # DeepSpeed's ZeRO sets its own flag
                    opt.overflow = False
                return real_step(*args, **kwargs)
            opt.overflow = True
            for key in list(getattr(opt, "averaged_gradients", {}) or {}):  # ZeRO-1/2 reduced partitions
                opt.averaged_gradients[key] = None
            return None

        opt.step = guarded_step
