"""MoE economics: parameters, FLOPs, memory and all-to-all traffic of a model config, before training.

    python -m moetrain.plan model=mixtral_8x7b parallel.ep_size=8 [plan.dp_size=16] [plan.format=json]

Everything here is arithmetic on a :class:`~moetrain.config.ModelConfig`; nothing builds a model or
imports torch. Formulas and assumptions are in ``docs/PLAN.md``. The pure functions
(:func:`count_params`, :func:`flops_per_token`, :func:`memory_plan`, :func:`all_to_all_volume`,
:func:`build_plan`, :func:`plan_summary`) are the API; :func:`main` is the Hydra CLI.

Modules: ``params`` (counts, FLOPs, dense equivalent), ``activations``, ``memory`` (per-rank bytes, the fit
verdict and check), ``machine`` (what this machine has),
``report`` (the JSON dict, tables, start-of-run summary), ``cli`` (Hydra entry point).
"""

from moetrain.plan.activations import ACTIVATION_BYTES, activation_memory
from moetrain.plan.fmt import fmt_bytes, fmt_count, fmt_flops
from moetrain.plan.machine import host_available_memory, machine_memory
from moetrain.plan.memory import (
    all_to_all_volume,
    check_memory_fits,
    check_parallel,
    fitting_settings,
    memory_plan,
    resolve_dtype,
)
from moetrain.plan.params import (
    BYTES_PER_PARAM,
    COMPONENTS,
    count_params,
    dense_equivalent,
    flops_per_token,
)
from moetrain.plan.report import build_plan, plan_summary, render

__all__ = [
    "ACTIVATION_BYTES",
    "BYTES_PER_PARAM",
    "COMPONENTS",
    "activation_memory",
    "all_to_all_volume",
    "build_plan",
    "check_memory_fits",
    "check_parallel",
    "count_params",
    "dense_equivalent",
    "flops_per_token",
    "fmt_bytes",
    "fmt_count",
    "fitting_settings",
    "fmt_flops",
    "host_available_memory",
    "machine_memory",
    "memory_plan",
    "plan_summary",
    "render",
    "resolve_dtype",
]
