"""The training loop on the DeepSpeed engine. ``moetrain/train.py`` is the Hydra entry point."""

from moetrain.trainer.loop import Trainer

__all__ = ["Trainer"]
