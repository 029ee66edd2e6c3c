"""Saving and restoring whole training state, atomically.

Layout of one checkpoint (``checkpoints/step_00000100/``): see ``moetrain/checkpoint/__init__.py``.
Every rank writes into ``checkpoints/.tmp-step_00000100/``; after a barrier rank 0 hashes every file
into ``manifest.json`` (written last, fsynced), renames the folder to its final name and only then
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

import torch
from safetensors.torch import save_file

from moetrain.checkpoint.integrity import fsync_dir, verify, write_manifest
from moetrain.checkpoint.model_file import LATEST, TOKENIZER_DIR, CheckpointError, save_model_file
from moetrain.checkpoint.optimizer_state import FILE as OPTIMIZER_FILE
from moetrain.checkpoint.rank_state import write_rank_state
from moetrain.distributed import barrier

STATE_FILE = "trainer_state.json"


# Tests only: MOETRAIN_TEST_KILL_IN_SAVE=POINT@STEP sends SIGKILL to this process at that point of the
# save of that step (points: files, manifest, renamed), to show that no moment of a save loses a run.
FAULT_ENV = "MOETRAIN_TEST_KILL_IN_SAVE"


def _fault_point(name: str, step: int) -> None:
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

    # ---- saving -------------------------------------------------------------------------------
    def save(
        self,
        *,
        step: int,
        model_state: dict[str, torch.Tensor] | None,
        optimizer_state: dict[str, torch.Tensor] | None,
        config: dict[str, Any],
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        tokenizer: Any | None,
    ) -> Path:
        """Collective: every rank calls it. ``model_state`` and ``optimizer_state`` (layout-free, all
        experts; see checkpoint/optimizer_state.py) are needed on rank 0 only."""
        final = self.root / step_dirname(step)
        tmp = self.root / f".tmp-{step_dirname(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        write_rank_state(tmp, self.rank, rank_state["loader"])
        _fault_point("files", step)
        if self.rank == 0:
            assert model_state is not None
            save_model_file(model_state, tmp, config)
            if optimizer_state:
                save_file(optimizer_state, str(tmp / OPTIMIZER_FILE), metadata={"producer": "moetrain"})
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        barrier()
        if self.rank == 0:
            write_manifest(tmp)  # last: a folder with a manifest is complete
            _fault_point("manifest", step)
            if final.exists():  # re-saving a step (e.g. a resumed run stopping where it started)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fault_point("renamed", step)
            pointer = self.root / f".{LATEST}.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.root / LATEST)
            fsync_dir(self.root)
            self._prune(keep=final)
        barrier()
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
