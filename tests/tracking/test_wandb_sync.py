"""A stopped-and-resumed offline run uploads to W&B as one run, from metrics.jsonl.

Offline W&B writes one folder per process start; syncing several folders with one id does not append
them (wandb/wandb#3841). ``moetrain.tracking.wandb_sync`` replays the de-duplicated metrics.jsonl into
one run. Checked offline: W&B's run file stores logged floats verbatim, so every record's loss must be
in the consolidated run's file, and the second segment's own folder must lack the first segment's.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from moetrain.testing import check_ok, describe, offline_env, run_command, run_train, tiny


def _losses(run_dir: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }


def _run_file(folder: Path) -> bytes:
    (path,) = folder.glob("run-*.wandb")
    return path.read_bytes()


@pytest.mark.slow
def test_resumed_offline_run_syncs_as_one_run(tmp_path: Path):
    run_dir = tmp_path / "run"
    common = ("logging.wandb.mode=offline", "trainer.max_steps=8", "trainer.resume=auto")
    check_ok(run_train(run_dir, *tiny(*common, "trainer.stop_at=4")))
    check_ok(run_train(run_dir, *tiny(*common)))
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2, segments
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    first_half = [json.dumps(losses[s]).encode() for s in range(1, 5)]
    assert not any(x in _run_file(segments[1]) for x in first_half), "a segment holds only its own steps"

    proc = run_command(
        [sys.executable, "-m", "moetrain.tracking.wandb_sync", str(run_dir), "--offline"],
        env=offline_env(),
        timeout=120,
    )
    assert proc.returncode == 0, describe(proc)
    m = re.search(r"wrote (\S+); upload it with: wandb sync \1", proc.stdout)
    assert m, describe(proc)
    data = _run_file(Path(m.group(1)))
    missing = [s for s, v in losses.items() if json.dumps(v).encode() not in data]
    assert not missing, f"steps {missing} not in the consolidated run"


def test_wandb_sync_without_metrics_is_one_line(tmp_path: Path):
    proc = run_command(
        [sys.executable, "-m", "moetrain.tracking.wandb_sync", str(tmp_path), "--offline"],
        env=offline_env(),
        timeout=60,
    )
    assert proc.returncode == 2, describe(proc)
    assert proc.stdout.strip().count("\n") == 0 and "metrics.jsonl not found" in proc.stdout
    assert "Traceback" not in proc.stderr
