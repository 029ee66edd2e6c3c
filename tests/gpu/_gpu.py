"""Skip markers for the CUDA tests (``make test-gpu`` runs ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from moetrain.moe.backends import megablocks_unavailable_reason

# Cheap on CPU hosts: returns before anything of megablocks is imported when CUDA is absent.
MEGABLOCKS_REASON = megablocks_unavailable_reason()

requires_megablocks = pytest.mark.skipif(
    MEGABLOCKS_REASON is not None, reason=f"needs CUDA and megablocks: {MEGABLOCKS_REASON}"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason=f"needs 2 CUDA devices, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}",
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32 (0 when both are zero)."""
    a, b = a.detach().float(), b.detach().float()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()
