"""What may end or alter a step from outside the math: stop requests and numeric faults.

- ``StopRequest``: SIGTERM / SIGINT / SIGUSR1 (``trainer.stop_signals``) and the wall-clock limit
  (``trainer.stop_after_minutes``) share one mechanism. A handler only sets a flag; the loop polls
  at each step boundary with one collective (``any_rank``), so every rank stops after the same step,
  saves one complete checkpoint and exits 0. A second signal during the save changes nothing: the
  save is atomic and already under way.
- ``NonFiniteGuard``: a non-finite loss or gradient norm, agreed on by all ranks before the
  optimizer step, either skips that update (at most ``trainer.max_skipped_steps`` in the last
  ``trainer.skip_window`` steps) or stops the run (``trainer.on_nonfinite``).
- ``weights_finite``: no checkpoint and no end-of-run sample from non-finite weights.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque

import torch

from moetrain.distributed import any_rank


class TrainingDiverged(RuntimeError):
    """Numeric fault beyond the configured policy (one line: the step and what to change)."""


class StopRequest:
    def __init__(self, signal_names: list[str], stop_after_minutes: float | None, log=print) -> None:
        self.signal_names = list(signal_names)
        self.deadline = time.time() + 60 * stop_after_minutes if stop_after_minutes else None
        self.stop_after_minutes = stop_after_minutes
        self.received: str | None = None
        self.count = 0
        self._log = log
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Signal handlers can only be set from the main thread (elsewhere: wall clock only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signal_names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            # stderr, unbuffered: the one line a cluster log shows even if the save is then killed
            print(f"{name} received: stopping after this step with a checkpoint", file=sys.stderr, flush=True)
        else:
            print(
                f"{name} received again: already stopping, the checkpoint is being written",
                file=sys.stderr,
                flush=True,
            )

    def local_reason(self) -> str | None:
        if self.received is not None:
            return self.received
        if self.deadline is not None and time.time() >= self.deadline:
            return f"trainer.stop_after_minutes={self.stop_after_minutes:g} reached"
        return None

    def poll(self) -> str | None:
        """Collective: every rank calls it at the same step; all get a reason, or all get None."""
        mine = self.local_reason()
        if not any_rank(mine is not None):
            return None
        return mine or "stop requested on another rank"


class NonFiniteGuard:
    def __init__(self, policy: str, max_skips: int, window: int) -> None:
        self.policy, self.max_skips, self.window = policy, max_skips, window
        self.skipped_at: deque[int] = deque()
        self.total_skipped = 0

    def on_fault(self, step: int, what: str) -> str:
        """Record a non-finite step; return the message to log, or raise ``TrainingDiverged``."""
        if self.policy == "stop":
            raise TrainingDiverged(
                f"{what} at step {step}; the update was not applied (trainer.on_nonfinite=stop); "
                "fix: lower optim.lr or set optim.grad_clip, then resume with trainer.resume=auto"
            )
        self.skipped_at.append(step)
        while self.skipped_at and self.skipped_at[0] <= step - self.window:
            self.skipped_at.popleft()
        self.total_skipped += 1
        if len(self.skipped_at) > self.max_skips:
            raise TrainingDiverged(
                f"{what} at step {step}: {len(self.skipped_at)} updates skipped in the last {self.window} "
                f"steps (trainer.max_skipped_steps={self.max_skips}); the run diverged; fix: lower "
                "optim.lr or set optim.grad_clip, then resume from the last checkpoint"
            )
        return (
            f"warning: {what} at step {step}: update skipped "
            f"({len(self.skipped_at)} of at most {self.max_skips} in {self.window} steps)"
        )


@torch.no_grad()
def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every weight this rank holds is finite (no checkpoint or sample from broken weights)."""
    # ZeRO-3: a parameter's data is empty outside the forward; its partition is ds_tensor
    flags = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True
