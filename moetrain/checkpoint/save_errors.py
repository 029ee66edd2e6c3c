"""What a failed save does: one line, and ``trainer.on_save_error`` decides whether training goes on.

Every kind of failure (OSError such as a full disk, safetensors' own errors, a rank that fails
while the others succeed) reaches this one place after the ranks agreed on it
(``Checkpointer.wait``); the partial folder is already gone and ``latest`` still names the previous
checkpoint. ``continue``: train on and try again at the next cadence, stop after
``trainer.max_failed_saves`` failures in a row; ``stop``: stop now. Either way the run ends
non-zero when its last save failed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moetrain.checkpoint.size import fmt_bytes


class SaveFailure(RuntimeError):
    """The run must stop: a save failed and the policy says so (one line, exit non-zero)."""


def free_bytes(folder: Path) -> int | None:
    for p in (folder, *folder.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


class SavePolicy:
    def __init__(self, on_error: str, max_failed: int, predicted_bytes: int) -> None:
        self.on_error, self.max_failed, self.predicted = on_error, max_failed, predicted_bytes
        self.in_a_row = 0
        self.total_failed = 0

    def succeeded(self) -> None:
        self.in_a_row = 0

    def failed(
        self,
        step: int,
        cause: str,
        root: Path,
        latest: Path | None,
        log: Callable[[str], None],
        *,
        final: bool,
    ) -> None:
        self.in_a_row += 1
        self.total_failed += 1
        free = free_bytes(root)
        line = (
            f"error: checkpoint of step {step} failed ({cause}); {fmt_bytes(free) if free is not None else '?'} "
            f"free in {root}, a checkpoint takes ~{fmt_bytes(self.predicted)}; latest stays "
            f"{latest.name if latest else '(none)'}"
        )
        if final:
            raise SaveFailure(line.removeprefix("error: ") + "; it was the run's last checkpoint")
        if self.on_error == "stop":
            raise SaveFailure(line.removeprefix("error: ") + "; trainer.on_save_error=stop: stopping")
        if self.in_a_row >= self.max_failed:
            raise SaveFailure(
                line.removeprefix("error: ")
                + f"; {self.in_a_row} saves failed in a row (trainer.max_failed_saves): stopping"
            )
        log(
            line + "; training goes on (trainer.on_save_error=continue), next try at the next checkpoint step"
        )


def disk_check(root: Path, checkpoint_bytes: int, trainer_cfg: Any) -> list[str]:
    """At launch: can the checkpoint folder's filesystem hold ``keep_last + 1`` checkpoints (the
    newest ``keep_last`` and the one being written)? Checkpoints already there count as room (they
    are pruned as new ones land). Too little raises a one-line error, or with
    ``on_save_error=continue`` returns a warning."""
    from moetrain.checkpoint.model_file import CheckpointError

    free = free_bytes(root)
    if free is None:
        return []
    saves = 1 + (trainer_cfg.max_steps // trainer_cfg.checkpoint_every if trainer_cfg.checkpoint_every else 0)
    need = min(trainer_cfg.keep_last + 1, saves) * checkpoint_bytes
    existing = sum(p.stat().st_size for p in root.glob("step_*/**/*") if p.is_file()) if root.is_dir() else 0
    if free + existing >= need:
        return []
    line = (
        f"{root} has {fmt_bytes(free)} free, the checkpoints asked for need ~{fmt_bytes(need - existing)} more "
        f"(keep_last={trainer_cfg.keep_last} + 1 being written, ~{fmt_bytes(checkpoint_bytes)} each); fix: "
        "free space, lower trainer.keep_last, or another hydra.run.dir"
    )
    if trainer_cfg.on_save_error == "continue":
        return [
            f"warning: {line} (trainer.on_save_error=continue: saves that do not fit will fail and be reported)"
        ]
    raise CheckpointError(line)
