"""``metrics.jsonl``: one JSON object per logged step, appended and flushed (rank 0 only)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsFile:
    def __init__(self, path: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and resume_step is not None and path.is_file():
            self._truncate_after(resume_step)
        # append: a resumed run continues the file; kept open for the run, closed in close()
        self._f = open(path, "a") if enabled else None  # noqa: SIM115

    def _truncate_after(self, step: int) -> None:
        """A run resumed at ``step`` drops records logged after it (they will be logged again)."""
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= step
        ]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
