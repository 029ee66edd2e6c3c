"""The Mixtral-style decoder. Plain PyTorch: no ranks, no process groups (see distributed/).

``MoETransformer`` and ``ModelOutput`` load on first access (PEP 562): moe/ builds its shared expert
from ``model.layers.SwiGLU``, and an eager import of the transformer here would import moe/ again
half-way through its own import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moetrain.model.transformer import ModelOutput, MoETransformer

__all__ = ["ModelOutput", "MoETransformer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moetrain.model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
