"""One training process per run directory: an advisory lock held by rank 0 for the whole run.

``RUN_DIR/.moetrain.lock`` is locked with ``fcntl.flock`` and names its holder (host, pid, start
time, command). The kernel drops the lock when the holder exits, however it exits (kill -9
included), so a lock file whose holder is gone is simply taken over, with a warning naming it.
On network filesystems (NFS, Lustre) ``flock`` may be local to one node or unsupported: where the
lock cannot be taken the file's contents decide (a holder on this host that no longer runs is
taken over; anything else stops the launch), see docs/RELIABILITY.md.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from moetrain.checkpoint.model_file import CheckpointError

LOCK_FILE = ".moetrain.lock"
FORCE_KEY = "trainer.force_unlock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
        f"({holder.get('command', '?')[:120]})"
    )


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, *, force: bool = False) -> list[str]:
        """Take the lock; returns warnings to print. Raises CheckpointError (one line) when another
        live process holds it."""
        warnings: list[str] = []
        previous = self._holder()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as e:
            locked = False
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # flock unsupported here (some NFS / Lustre mounts): the file's contents decide
                warnings.append(f"warning: {self.path}: advisory locks unsupported here ({e.strerror})")
                if previous and not self._gone(previous) and not force:
                    os.close(fd)
                    raise self._busy(previous) from None
            elif not force:
                os.close(fd)
                raise self._busy(previous) from None
        if previous and (locked or force) and previous.get("pid") != os.getpid():
            if force and not locked:
                warnings.append(f"warning: {FORCE_KEY}=true: taking the lock of {_describe(previous)}")
            elif self._gone(previous):
                warnings.append(
                    f"warning: taking over the run-dir lock left by {_describe(previous)}: not running"
                )
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return warnings

    @staticmethod
    def _gone(holder: dict) -> bool:
        return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))

    def _busy(self, holder: dict) -> CheckpointError:
        who = _describe(holder) if holder else "another process"
        return CheckpointError(
            f"run dir {self.path.parent} is in use by {who}; fix: wait for it to finish, use another "
            f"hydra.run.dir, or set {FORCE_KEY}=true if that process is known to be dead"
        )

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
