"""Per-rank memory of a training layout: weights, gradients, AdamW state; the launch-time fit check."""

from __future__ import annotations

import math
from typing import Any

from moetrain.config import ConfigError, ModelConfig
from moetrain.plan.activations import ACTIVATION_BYTES, activation_memory
from moetrain.plan.fmt import fmt_bytes
from moetrain.plan.params import BYTES_PER_PARAM, count_params

REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default
GIB = 2**30


def check_parallel(
    model_cfg: ModelConfig,
    *,
    ep_size: int = 1,
    dp_size: int = 1,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
) -> None:
    """Raise a one-line :class:`ConfigError` unless the layout is one plan can count: the parallel
    settings through training's own validation (moetrain/config/training.py), plus plan.dp_size."""
    from moetrain.config import ParallelConfig, _require
    from moetrain.config.training import check_expert_layout

    _require(
        isinstance(ep_size, int) and not isinstance(ep_size, bool),
        "parallel.ep_size",
        ep_size,
        "an integer >= 1",
    )
    parallel = ParallelConfig(ep_size=ep_size, zero_stage=zero_stage, offload_optimizer=offload_optimizer)
    parallel.validate()
    check_expert_layout(model_cfg, parallel)
    _require(
        isinstance(dp_size, int) and not isinstance(dp_size, bool) and dp_size >= 1,
        "plan.dp_size",
        dp_size,
        "must be an integer >= 1",
    )
    _require(
        dp_size % ep_size == 0,
        "plan.dp_size",
        dp_size,
        f"must be a multiple of parallel.ep_size={ep_size} (the world is dp_size ranks)",
    )


def resolve_dtype(dtype: str) -> str:
    """``fp32`` or ``bf16``: the trainer's own rule for ``auto`` (config.training_dtype); fp16 counts as bf16."""
    from moetrain.config import training_dtype

    return training_dtype("bf16" if dtype == "fp16" else dtype)


def _block_params(model_cfg: ModelConfig, counts: dict[str, Any], ep_size: int) -> int:
    """Parameters of the largest block on one rank (what ZeRO-3 gathers at a time)."""
    t = counts["total_breakdown"]
    layers = max(1, model_cfg.num_layers)
    per_layer = (t["attention"] + t["norms"] + t["router"] + t["shared_expert"]) / layers
    moe = counts["moe_layers"]
    ffn = t["experts"] / ep_size / moe if moe else 0
    if counts["dense_layers"]:
        ffn = max(ffn, t["dense_ffn"] / counts["dense_layers"])
    return math.ceil(per_layer + ffn)


def memory_plan(
    model_cfg: ModelConfig,
    *,
    ep_size: int = 1,
    dp_size: int = 1,
    zero_stage: int = 0,
    dtype: str = "bf16",
    offload_optimizer: bool = False,
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    device_memory_gib: float = 80.0,
) -> dict[str, Any]:
    """Bytes for weights, gradients, AdamW state and activations: whole model, and on one rank.

    The world is ``dp_size`` ranks. Non-expert params are replicated on every rank; each rank
    holds ``num_experts / ep_size`` experts of every MoE layer. ZeRO-1 partitions optimizer state,
    ZeRO-2 also gradients, ZeRO-3 also weights: non-expert state over ``dp_size`` ranks, expert
    state over the expert-data-parallel group of ``dp_size / ep_size`` ranks. docs/PLAN.md, "Memory".

    ``per_rank``: ``weights``, ``grads``, ``optimizer`` (the training state; ``total`` is their sum),
    ``fp32_grad_step`` (fp32 gradient copies made at the optimizer step), ``buffers`` (DeepSpeed's
    gradient reduce bucket, ZeRO-3's gathered parameters), ``activations``; ``device_total`` and
    ``host_total`` (``offload_optimizer``: fp32 masters, moments and fp32 gradients live in host
    memory). ``fits``: ``device_total`` <= ``device_memory_gib`` GiB.
    """
    check_parallel(
        model_cfg,
        ep_size=ep_size,
        dp_size=dp_size,
        zero_stage=zero_stage,
        offload_optimizer=offload_optimizer,
    )
    dtype = resolve_dtype(dtype)
    counts = count_params(model_cfg)
    dense_p, expert_p = counts["non_expert_params"], counts["expert_params"]
    local_expert_p = expert_p // ep_size
    edp = dp_size // ep_size
    b = BYTES_PER_PARAM[dtype]

    def shard(nbytes: int, partitioned: bool) -> int:
        """Bytes of ``nbytes``-per-parameter state on one rank, partitioned or not."""
        if not partitioned:
            return (dense_p + local_expert_p) * nbytes
        return math.ceil(dense_p * nbytes / dp_size) + math.ceil(local_expert_p * nbytes / edp)

    total = {k: counts["total"] * v for k, v in b.items()}
    total["total"] = sum(total.values())
    per_rank = {
        "weights": shard(b["weights"], zero_stage >= 3),
        "grads": shard(b["grads"], zero_stage >= 2),
        "optimizer": shard(b["optimizer"], zero_stage >= 1),
    }
    if model_cfg.lora.rank:  # the base frozen: its weights only; gradients and AdamW state for the adapters
        per_rank, dense_p, local_expert_p = lora_memory(
            model_cfg, per_rank["weights"], ep_size, dp_size, zero_stage, b
        )
    per_rank["total"] = sum(per_rank.values())
    # The optimizer step's fp32 gradients: moetrain's ZeRO-0 bf16 step casts every gradient at once
    # (distributed/deepspeed_patches.py lean_bf16_step); DeepSpeed's ZeRO 1-3 cast one parameter
    # group's partition at a time (stage_1_and_2.py step: flat partition .to(fp32)), dense or expert,
    # whichever is larger.
    if zero_stage == 0:
        fp32_step = (dense_p + local_expert_p) * 4 if dtype == "bf16" else 0
    else:
        fp32_step = 4 * max(math.ceil(dense_p / dp_size), math.ceil(local_expert_p / edp))
    buffers = 0
    if zero_stage >= 1 and dp_size > 1:  # contiguous_gradients' reduce bucket, model dtype
        buffers += min(REDUCE_BUCKET_ELEMENTS, dense_p + local_expert_p) * b["grads"]
    if zero_stage >= 3:  # a block gathered for compute and the next one prefetched
        buffers += 2 * _block_params(model_cfg, counts, ep_size) * b["weights"]
    seq_len = seq_len or model_cfg.max_seq_len
    acts = activation_memory(
        model_cfg,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        dtype=dtype,
        checkpointing=activation_checkpointing,
    )
    per_rank["fp32_grad_step"] = fp32_step
    per_rank["buffers"] = buffers
    per_rank["activations"] = acts["total"]
    device_state = per_rank["weights"] + per_rank["grads"] + buffers
    if offload_optimizer:
        per_rank["host_total"] = per_rank["optimizer"] + fp32_step
    else:
        per_rank["host_total"] = 0
        device_state += per_rank["optimizer"]
    # Activations are gone by the optimizer step, where the fp32 gradients appear: the peak is the larger.
    step_extra = 0 if offload_optimizer else fp32_step
    per_rank["device_total"] = device_state + max(acts["total"], step_extra)
    return {
        "dtype": dtype,
        "bytes_per_param": dict(b),
        "total": total,
        "per_rank": per_rank,
        "per_rank_params": {
            "non_expert": dense_p,
            "expert": local_expert_p,
            "total": dense_p + local_expert_p,
        },
        "activations": acts,
        "settings": {
            "ep_size": ep_size,
            "dp_size": dp_size,
            "zero_stage": zero_stage,
            "offload_optimizer": offload_optimizer,
            "micro_batch_size": micro_batch_size,
            "seq_len": seq_len,
            "activation_checkpointing": activation_checkpointing,
        },
        "device_memory_gib": device_memory_gib,
        "fits": per_rank["device_total"] <= device_memory_gib * GIB,
    }


# Settings a user can change, as the override that sets them.
_OVERRIDE = {
    "zero_stage": "parallel.zero_stage",
    "offload_optimizer": "parallel.offload_optimizer",
    "activation_checkpointing": "parallel.activation_checkpointing",
    "micro_batch_size": "optim.micro_batch_size",
    "dp_size": "plan.dp_size",
    "ep_size": "parallel.ep_size",
}


def _describe(change: dict[str, Any]) -> str:
    return " ".join(
        f"{_OVERRIDE[k]}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items()
    )


def fitting_settings(
    model_cfg: ModelConfig, settings: dict[str, Any], dtype: str, budget: int
) -> list[dict[str, Any]]:
    """Changes to ``settings`` (memory_plan's keywords) under which one rank needs <= ``budget`` bytes,
    each computed: the lowest ZeRO stage that fits, optimizer offload, activation checkpointing, the
    largest smaller micro-batch, the fewest more ranks (ep as large as the experts allow); pairs of
    the first three when no single change fits. ``[{"change", "override", "device_total"}]``."""
    s = dict(settings)

    def need(change: dict[str, Any]) -> int | None:
        trial = {**s, **change}
        if trial.get("offload_optimizer") and trial["zero_stage"] < 1:
            trial["zero_stage"] = change.setdefault("zero_stage", 1)
        try:
            return memory_plan(model_cfg, dtype=dtype, **trial)["per_rank"]["device_total"]
        except ConfigError:
            return None

    singles: list[dict[str, Any]] = []
    for stage in range(s["zero_stage"] + 1, 4):
        singles.append({"zero_stage": stage})
    if not s["offload_optimizer"]:
        singles.append({"offload_optimizer": True})
    if not s["activation_checkpointing"]:
        singles.append({"activation_checkpointing": True})
    found = [c for c in singles if (n := need(dict(c))) is not None and n <= budget]
    stages = [c for c in found if "zero_stage" in c and len(c) == 1]
    found = [c for c in found if not ("zero_stage" in c and len(c) == 1)] + stages[:1]
    mb = s["micro_batch_size"] // 2
    while mb >= 1:
        n = need({"micro_batch_size": mb})
        if n is not None and n <= budget:
            found.append({"micro_batch_size": mb})
            break
        mb //= 2
    for factor in (2, 4, 8, 16, 32, 64, 128):
        dp = s["dp_size"] * factor
        ep = max(e for e in range(1, dp + 1) if dp % e == 0 and (model_cfg.num_experts % e == 0))
        ep = max(ep, s["ep_size"])
        change = {"dp_size": dp} if ep == s["ep_size"] else {"dp_size": dp, "ep_size": ep}
        n = need(dict(change))
        if n is not None and n <= budget:
            found.append(change)
            break
    if not found:  # pairs of the switches
        switches = [c for c in singles if list(c) != ["zero_stage"] or c["zero_stage"] == 3]
        for i, first in enumerate(switches):
            for second in switches[i + 1 :]:
                change = {**first, **second}
                n = need(dict(change))
                if n is not None and n <= budget:
                    found.append(change)
    out = []
    for change in found:
        n = need(dict(change))
        out.append({"change": change, "override": _describe(change), "device_total": n})
    return out


def check_memory_fits(
    model_cfg: ModelConfig,
    *,
    ep_size: int,
    world_size: int,
    zero_stage: int,
    dtype: str,
    available: int,
    machine: str,
    offload_optimizer: bool = False,
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    host_is_device: bool = True,
) -> None:
    """Raise a one-line :class:`ConfigError` when one rank cannot fit in ``available`` bytes.

    The estimate is :func:`memory_plan`'s, the same numbers ``python -m moetrain.plan`` prints:
    ``device_total`` (+ ``host_total`` when the device is the host, i.e. CPU training). The message
    names the settings that would fit (:func:`fitting_settings`); ``machine`` describes ``available``.
    """
    settings = {
        "ep_size": ep_size,
        "dp_size": world_size,
        "zero_stage": zero_stage,
        "offload_optimizer": offload_optimizer,
        "micro_batch_size": micro_batch_size,
        "seq_len": seq_len,
        "activation_checkpointing": activation_checkpointing,
    }
    mem = memory_plan(model_cfg, dtype=dtype, **settings)
    r = mem["per_rank"]
    need = r["device_total"] + (r["host_total"] if host_is_device else 0)
    if need <= available:
        return
    layout = (
        f"ep_size={ep_size}, {world_size} process{'es' if world_size > 1 else ''}, ZeRO-{zero_stage}, "
        f"micro-batch {micro_batch_size} x {mem['settings']['seq_len']} tokens"
    )
    options = fitting_settings(model_cfg, settings, dtype, available)
    fixes = (
        "settings that fit: " + "; ".join(o["override"] for o in options)
        if options
        else "use a smaller model (e.g. model=mixtral_small) or a machine with more memory"
    )
    raise ConfigError(
        f"model {model_cfg.name} needs about {fmt_bytes(need)} per process to train ({mem['dtype']} weights + "
        f"gradients + AdamW state + activations; {layout}) but {machine}: {fixes} "
        "(parallel.check_memory=false skips this check)"
    )


def all_to_all_volume(model_cfg: ModelConfig, *, ep_size: int = 1, dtype: str = "bf16") -> dict[str, Any]:
    """Bytes one token sends to other ranks in the expert all-to-all (uniform routing assumed).

    Per MoE layer, forward: dispatch + combine, ``top_k`` copies of a ``hidden_size`` vector each,
    of which ``(ep - 1) / ep`` leave the rank: ``2 * top_k * H * bytes * (ep - 1) / ep``.
    Training doubles it (the backward pass runs both all-to-alls in reverse).
    """
    dtype = resolve_dtype(dtype)
    nbytes = ACTIVATION_BYTES[dtype]
    moe_layers = len(model_cfg.moe_layer_ids)
    remote = (ep_size - 1) / ep_size if moe_layers else 0.0
    fwd = 2 * model_cfg.top_k * model_cfg.hidden_size * nbytes * remote if moe_layers else 0.0
    return {
        "ep_size": ep_size,
        "dtype": dtype,
        "bytes_per_element": nbytes,
        "moe_layers": moe_layers,
        "remote_fraction": remote,
        "per_token_per_layer": {"forward": fwd, "training": 2 * fwd},
        "per_token": {"forward": fwd * moe_layers, "training": 2 * fwd * moe_layers},
    }


def lora_memory(
    model_cfg: ModelConfig, base_weights: int, ep_size: int, dp_size: int, zero_stage: int, b: dict[str, int]
) -> tuple[dict[str, int], int, int]:
    """Per-rank bytes of a LoRA run (``model.lora.rank`` > 0): the frozen base's weights as full
    training holds them (``base_weights``: no gradient, no master, no optimizer state), and the
    adapters (this rank's experts' share) with gradients and AdamW state, partitioned by ZeRO as full
    training's are. Also returns the trainable non-expert and expert parameter counts of one rank."""
    from moetrain.model.lora import lora_param_count

    n = lora_param_count(model_cfg, ep_size)
    edp = dp_size // ep_size

    def shard(nbytes: int, partitioned: bool) -> int:
        if not partitioned:
            return (n["non_expert"] + n["expert"]) * nbytes
        return math.ceil(n["non_expert"] * nbytes / dp_size) + math.ceil(n["expert"] * nbytes / edp)

    per_rank = {
        "weights": base_weights + shard(b["weights"], zero_stage >= 3),
        "grads": shard(b["grads"], zero_stage >= 2),
        "optimizer": shard(b["optimizer"], zero_stage >= 1),
    }
    return per_rank, n["non_expert"], n["expert"]
