"""The Mixtral-style decoder. Plain PyTorch: no ranks, no process groups (see distributed/)."""

from moetrain.model.transformer import ModelOutput, MoETransformer

__all__ = ["ModelOutput", "MoETransformer"]
