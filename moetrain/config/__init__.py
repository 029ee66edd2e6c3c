"""Typed configuration: Hydra composes YAML, these dataclasses validate it.

Every check runs when the config is built, before any expensive work, and fails with a one-line
``ConfigError`` naming the field, the value and what is allowed. One module per section (model.py,
data.py, training.py), the builders and Hydra's ``base`` nodes in build.py.
"""

from moetrain.config.build import (
    CONFIG_GROUPS,
    check_world_size,
    model_config_from_dict,
    parallel_config_from_dict,
    register_config_defaults,
    to_dict,
    train_config_from_dict,
    training_dtype,
)
from moetrain.config.data import (
    DATA_LOADERS,
    DATA_NAME_ALIASES,
    DATA_SOURCES,
    ON_EXHAUSTED,
    TEXT_SPLITS,
    TOKEN_DTYPES,
    DataConfig,
    suggest_data_name,
)
from moetrain.config.errors import ConfigError, _require
from moetrain.config.model import (
    AUX_LOSS_SCOPES,
    AUX_LOSS_TYPES,
    EXPERT_IMPLS,
    LORA_TARGETS,
    MOE_BACKENDS,
    QK_NORMS,
    SCORE_FUNCTIONS,
    LoRAConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    arch_fields,
    shape_fields,
)
from moetrain.config.training import (
    HOST_ALLOCATORS,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainerConfig,
    WandbConfig,
)

__all__ = [
    "AUX_LOSS_SCOPES",
    "AUX_LOSS_TYPES",
    "CONFIG_GROUPS",
    "DATA_LOADERS",
    "DATA_NAME_ALIASES",
    "DATA_SOURCES",
    "EXPERT_IMPLS",
    "HOST_ALLOCATORS",
    "LORA_TARGETS",
    "MOE_BACKENDS",
    "ON_EXHAUSTED",
    "QK_NORMS",
    "SCORE_FUNCTIONS",
    "TEXT_SPLITS",
    "TOKEN_DTYPES",
    "ConfigError",
    "DataConfig",
    "LoRAConfig",
    "LoggingConfig",
    "MLAConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "TrainerConfig",
    "WandbConfig",
    "_require",
    "arch_fields",
    "check_world_size",
    "model_config_from_dict",
    "parallel_config_from_dict",
    "register_config_defaults",
    "shape_fields",
    "suggest_data_name",
    "to_dict",
    "train_config_from_dict",
    "training_dtype",
]
