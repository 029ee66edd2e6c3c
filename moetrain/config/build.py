"""Building a validated TrainConfig from what Hydra composed; the dtype and world-size rules; Hydra's
``base`` nodes (the dataclasses are the one source of every default)."""

from __future__ import annotations

import dataclasses
from typing import Any

from moetrain.config.data import DataConfig
from moetrain.config.errors import ConfigError
from moetrain.config.model import ModelConfig
from moetrain.config.training import (
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainerConfig,
)


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Recursively build dataclass ``cls`` from a mapping, rejecting unknown keys with a one-liner."""
    if values is None:
        return cls()
    if dataclasses.is_dataclass(values):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}  # strings (postponed annotations)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where} is not a known option (known: {', '.join(sorted(known))})")
        f = known[key]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value, f"{prefix}.{key}" if prefix else key)
        elif key == "betas" and value is not None:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = _check_type(value, hints[key], f"{prefix}.{key}" if prefix else key)
    return cls(**kwargs)


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Reject a value of the wrong scalar type (``model.hidden_size=abc``) with a one-line error."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    options = [t.strip() for t in str(text).split("|")]
    if value is None:
        if "None" in options or "Any" in options:
            return value
        raise ConfigError(f"{where}=null is invalid: a value is required")
    allowed: tuple[type, ...] = ()
    for opt in options:
        if opt not in _SCALARS:
            return value  # lists, mappings, Any: checked by validate() where it matters
        allowed += _SCALARS[opt]
    if isinstance(value, bool) and bool not in allowed:  # True is an int in Python; not a size
        raise ConfigError(f"{where}={value!r} is invalid: expected {' or '.join(options)}")
    if not isinstance(value, allowed):
        raise ConfigError(
            f"{where}={value!r} is invalid: expected {' or '.join(o for o in options if o != 'None')}"
        )
    return (
        float(value) if "float" in options and "int" not in options and not isinstance(value, bool) else value
    )


def training_dtype(name: str) -> str:
    """``fp32`` or ``bf16`` for ``parallel.dtype``: ``auto`` is bf16 on a CUDA device that supports it,
    fp32 otherwise. The one rule, used by the trainer (trainer/engine.py) and by plan."""
    if name in ("fp32", "bf16"):
        return name
    if name != "auto":
        raise ConfigError(f"parallel.dtype={name!r} is invalid: one of auto, fp32, bf16")
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def check_world_size(parallel: ParallelConfig, world_size: int, *, module: str = "moetrain.train") -> None:
    """The number of processes must be a multiple of ``parallel.ep_size``; say how to start them."""
    ep = parallel.ep_size
    if world_size % ep == 0:
        return
    if world_size == 1:
        raise ConfigError(
            f"parallel.ep_size={ep} needs {ep} processes (or a multiple), but this is a single process: "
            f"start {ep} with `torchrun --nproc_per_node={ep} -m {module} ...` or "
            f"`NPROC={ep} scripts/train_local.sh ...` (or set parallel.ep_size=1)"
        )
    raise ConfigError(
        f"parallel.ep_size={ep} is invalid: must divide the number of processes ({world_size}); "
        f"start a multiple of {ep} processes or choose an ep_size that divides {world_size}"
    )


def parallel_config_from_dict(values: dict[str, Any]) -> ParallelConfig:
    cfg = _build(ParallelConfig, dict(values), "parallel")
    cfg.validate()
    return cfg


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    cfg = _build(ModelConfig, dict(values), "model")
    cfg.validate()
    return cfg


def train_config_from_dict(values: dict[str, Any], *, cross_checks: bool = True) -> TrainConfig:
    """Build and validate from a plain dict (e.g. ``OmegaConf.to_container(cfg, resolve=True)``).

    Keys that are not ours (``hydra``, ``plan``, ``experiment`` ...) are ignored at the top level.
    ``cross_checks=False`` validates each section only (the caller completes the model section, then
    calls ``validate()``).
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = _build(TrainConfig, {k: v for k, v in values.items() if k in known}, "")
    return cfg.validate() if cross_checks else cfg.validate_sections()


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---- Hydra: the dataclasses are the one source of every default ------------------------------------
# Each config group gets a `base` node holding its dataclass's defaults; every preset YAML starts from
# it (`defaults: [base, _self_]`) and holds only what differs, and every key exists for a command-line
# override. The nodes are plain dicts, not structured configs, so a wrongly typed value still fails
# with our one-line ConfigError (from _build) rather than OmegaConf's multi-line one.
CONFIG_GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
    "logging": LoggingConfig,
    "trainer": TrainerConfig,
}


def register_config_defaults() -> None:
    """Store each group's ``base`` node in Hydra's ConfigStore (idempotent; ``import moetrain`` does it,
    so any ``compose`` over the packaged configs finds them)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, cls in CONFIG_GROUPS.items():
        store.store(group=group, name="base", node=dataclasses.asdict(cls()))
