"""The checkpoints folder: publishing a completed checkpoint, ``latest``, walk-back, ``keep_last``.

Layout of one checkpoint (``checkpoints/step_00000100/``): see ``moetrain/checkpoint/__init__.py``.
Every rank writes into ``checkpoints/.tmp-step_00000100/`` (checkpoint/checkpointer.py); rank 0
writes ``manifest.json`` (last, fsynced), renames the folder to its final name and only then
rewrites ``latest`` (tmp file + rename). An interruption at any point (kill -9 included) leaves the
previous checkpoint as ``latest`` and never a half-written one under a final name; a checkpoint
damaged later fails its manifest and ``latest_intact`` walks back past it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from moetrain.checkpoint.integrity import fsync_dir, verify
from moetrain.checkpoint.model_file import LATEST, CheckpointError

STATE_FILE = "trainer_state.json"


# Tests only: MOETRAIN_TEST_KILL_IN_SAVE=POINT@STEP sends SIGKILL to this process at that point of the
# save of that step (points: files, manifest, renamed), to show that no moment of a save loses a run.
FAULT_ENV = "MOETRAIN_TEST_KILL_IN_SAVE"


def fault_point(name: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{name}@{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, root: Path, rank: int, keep_last: int) -> None:
        self.root = root
        self.rank = rank
        self.keep_last = keep_last

    # ---- publishing (rank 0, after every rank's files and the manifest are in ``tmp``) -------------
    def publish(self, tmp: Path, step: int) -> Path:
        """Rename ``tmp`` to its final name, then move ``latest`` to it (tmp file + rename), then
        prune: at every moment ``latest`` names a complete checkpoint."""
        final = self.root / step_dirname(step)
        fault_point("manifest", step)
        if final.exists():  # re-saving a step (e.g. a resumed run stopping where it started)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fault_point("renamed", step)
        pointer = self.root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, self.root / LATEST)
        fsync_dir(self.root)
        self._prune(keep=final)
        return final

    def discard_partial(self) -> None:
        """Remove an unfinished save's temporary folder (after a failed save, e.g. disk full)."""
        if self.rank == 0 and self.root.is_dir():
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        """Keep the newest ``keep_last`` checkpoints that pass a size check of their manifest; damaged
        ones don't count (so they can't push out the newest good one) and are left for the user;
        ``keep`` (the one just written and verified) is never removed."""
        complete = sorted(
            p for p in self.root.glob("step_*") if p.is_dir() and verify(p, hashes=False) is None
        )
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # ---- resuming -----------------------------------------------------------------------------
    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def latest_intact(self, warn=print) -> Path | None:
        """The newest checkpoint that passes its manifest, starting from ``latest``; each newer one
        that fails is named in a warning (what is wrong with it) and skipped, never deleted."""
        latest = self.latest()
        candidates = sorted((p for p in self.root.glob("step_*") if p.is_dir()), reverse=True)
        if latest is not None:  # latest first, then older ones
            candidates = [latest] + [p for p in candidates if p.name < latest.name]
        for folder in candidates:
            problem = verify(folder)
            if problem is None:
                return folder
            warn(f"warning: skipping checkpoint {folder}: {problem}")
        return None


def read_trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {STATE_FILE}: not a training checkpoint (pass a step_* folder)"
        )
    return json.loads(path.read_text())
