"""End-to-end runs of ``python -m moetrain.train`` with the megablocks backend on one GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._gpu import requires_megablocks

pytestmark = [pytest.mark.gpu, requires_megablocks]

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "+experiment=mixtral_small",
    "data=fixture",
    "data.vocab_size=512",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "logging.progress=false",
    "logging.heatmap_every=0",
]


def _train(run_dir: Path, *overrides: str, timeout: int = 600) -> list[dict]:
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="0")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "moetrain.train", *COMMON, f"hydra.run.dir={run_dir}", *overrides]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_mixtral_small_smoke_train(tmp_path: Path):
    recs = _train(tmp_path / "run", "model.moe.backend=megablocks", "trainer.max_steps=20")
    steps = [r for r in recs if "loss" in r]
    assert steps[-1]["step"] == 20
    losses = [r["loss"] for r in steps]
    assert all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(r["aux_loss"]) and math.isfinite(r["z_loss"]) for r in steps)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns


def test_megablocks_checkpoint_resumes_with_torch_backend(tmp_path: Path):
    """Same parameter names and layout: a megablocks checkpoint resumes under backend=torch."""
    run = tmp_path / "run"
    _train(run, "model.moe.backend=megablocks", "trainer.max_steps=10", "trainer.checkpoint_every=10")
    recs = _train(
        run,
        "model.moe.backend=torch",
        "trainer.max_steps=14",
        "trainer.resume=auto",
        "trainer.checkpoint_every=10",
    )
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps[-1] == 14 and 11 in steps
    assert all(math.isfinite(r["loss"]) for r in recs if "loss" in r)
