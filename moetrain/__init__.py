"""moetrain: end-to-end Mixture-of-Experts training."""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra config tree (train.yaml, plan.yaml and the groups), shipped inside the package so that
# an installed moetrain finds it from any directory.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Every config group's defaults come from the dataclasses in moetrain/config/ (Hydra's `base` nodes).
from moetrain.config import register_config_defaults  # noqa: E402

register_config_defaults()
