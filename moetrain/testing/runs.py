"""Runs shared by several tests of one session (``cached_run``) and reading their outputs."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetrain.testing.process import check_ok, run_train


# ---- runs shared by several tests in one session ----------------------------------------------------
@dataclass(frozen=True)
class TrainRun:
    run_dir: Path
    proc: subprocess.CompletedProcess
    seconds: float

    @property
    def ok(self) -> bool:
        return self.proc.returncode == 0

    def check(self) -> TrainRun:
        check_ok(self.proc)
        return self

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir)

    def by_step(self, key: str = "loss") -> dict[int, float]:
        return metric_by_step(self.run_dir, key)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"


_CACHE: dict[tuple[tuple[str, ...], int], TrainRun] = {}
_ROOT: Path | None = None


def session_dir() -> Path:
    """A temp dir for this process's cached runs, removed at exit (``MOETRAIN_TEST_KEEP=1`` keeps it)."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="moetrain-test-runs-"))
        if not os.environ.get("MOETRAIN_TEST_KEEP"):
            atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def cached_run(*overrides: str, nproc: int = 1, timeout: float = 300, name: str = "run") -> TrainRun:
    """``run_train`` once per distinct (overrides, nproc) per session; later calls return the same run.

    A failed run is cached too (tests sharing it all fail, with its output, without re-running)."""
    key = (tuple(overrides), nproc)
    if key not in _CACHE:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=session_dir()))
        start = time.time()
        proc = run_train(run_dir, *overrides, nproc=nproc, timeout=timeout)
        _CACHE[key] = TrainRun(run_dir, proc, time.time() - start)
    return _CACHE[key]


# ---- outputs ----------------------------------------------------------------------------------------
def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (one dict per logged step), in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def metric_by_step(run_dir: str | os.PathLike, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` for the records that have ``key`` (a resumed run's later record wins)."""
    return {int(r["step"]): r[key] for r in read_metrics(run_dir) if key in r}


def max_abs_diff(a: dict[int, float], b: dict[int, float], steps: Iterable[int] | None = None) -> float:
    steps = sorted(set(a) & set(b)) if steps is None else list(steps)
    if not steps:
        raise AssertionError("no common steps to compare")
    return max(abs(a[s] - b[s]) for s in steps)
