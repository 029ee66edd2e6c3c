"""Shared test setup: few threads (CI runs on 2 cores) and a deterministic seed."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def seed() -> int:
    """Seed torch's global RNG; returns the seed."""
    torch.manual_seed(0)
    return 0
