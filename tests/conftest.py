"""Shared test setup: few threads (CI runs on 2 cores) and a deterministic seed."""

from __future__ import annotations

import os

# Before torch loads its OpenMP runtime: idle threads sleep rather than spin (see offline_env).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads per test process on CI's 2 cores; under pytest-xdist the workers share them (several
# workers x 2 threads would oversubscribe the cores: OpenMP threads spin while they wait).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, 2 // _WORKERS))


@pytest.fixture
def seed() -> int:
    """Seed torch's global RNG; returns the seed."""
    torch.manual_seed(0)
    return 0
