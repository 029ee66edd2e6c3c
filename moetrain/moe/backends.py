"""Which kernels run the MoE layer: ``model.moe.backend`` = auto | torch | megablocks.

- ``torch``: plain PyTorch (argsort dispatch, ``grouped_mm`` or a loop of matmuls, ``index_add``).
- ``megablocks``: MegaBlocks' CUDA/Triton permute kernels and grouped GEMM over the *same* parameters
  (``moetrain.moe.megablocks_backend``). Needs a CUDA device, megablocks with its compiled extension
  ``megablocks_ops`` and ``grouped_gemm``; none of that imports on a CPU host.
- ``auto``: megablocks where it can run, else torch.

``resolve_backend`` runs when each ``MoELayer`` is built, so an impossible request fails with one
line before training starts. Nothing here imports megablocks at module import time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

import torch

from moetrain.config import ConfigError

FIX_HINT = (
    "fix: `pip install -e .[gpu]` on a CUDA host or use the Docker image in docker/ "
    "(docker/README.md), or set model.moe.backend=torch"
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@functools.lru_cache(maxsize=1)
def _extension_import_error() -> str | None:
    """Import megablocks' kernels once per process; the error text if that fails, else None."""
    try:
        importlib.import_module("megablocks_ops")  # the compiled CUDA extension (csrc/ops.cu)
        importlib.import_module("megablocks.ops")  # its Triton permute kernels (needs triton, stk)
    except Exception as e:  # ImportError, OSError (undefined CUDA symbols), RuntimeError, ...
        return f"its CUDA extension failed to import: {type(e).__name__}: {_one_line(e)}"
    try:
        from megablocks import grouped_gemm_util as gg  # noqa: PLC0415
    except Exception as e:
        return f"megablocks failed to import: {type(e).__name__}: {_one_line(e)}"
    if not gg.grouped_gemm_is_available():
        return "its grouped GEMM package grouped_gemm is not installed (megablocks' gg extra)"
    return None


def megablocks_unavailable_reason() -> str | None:
    """Why the megablocks backend cannot run in this process, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("megablocks") is None:
        return "megablocks is not installed"
    return _extension_import_error()


def resolve_backend(requested: str) -> str:
    """``auto`` -> ``megablocks`` or ``torch``; ``megablocks`` -> itself or a one-line ConfigError."""
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if not torch.cuda.is_available() or importlib.util.find_spec("megablocks") is None:
            return "torch"
        reason = _extension_import_error()
        if reason is not None:
            warnings.warn(
                f"model.moe.backend=auto: using torch, megablocks is installed but {reason}", stacklevel=2
            )
            return "torch"
        return "megablocks"
    if requested == "megablocks":
        reason = megablocks_unavailable_reason()
        if reason is not None:
            raise ConfigError(f"model.moe.backend='megablocks' cannot run here: {reason}; {FIX_HINT}")
        return "megablocks"
    raise ConfigError(f"model.moe.backend={requested!r} is invalid: one of ('auto', 'torch', 'megablocks')")
