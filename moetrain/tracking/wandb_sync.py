"""Upload a whole run to W&B as one run, from its ``metrics.jsonl``.

Why: offline W&B writes one ``wandb/offline-run-*`` folder per process start, so a run that was
stopped and resumed has several folders with the same run id, and ``wandb sync`` of those does not
append them: a later folder replaces the earlier one's history (wandb/wandb#3841, #5865). The run's
``metrics.jsonl`` is already the single, de-duplicated history (a resume drops records after the
resume step before appending). This command replays it into one W&B run::

    python -m moetrain.tracking.wandb_sync outputs/RUN            # online (needs `wandb login`)
    python -m moetrain.tracking.wandb_sync outputs/RUN --offline  # one offline folder, then `wandb sync` it
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from moetrain.tracking.wandb_run import _has_login, flatten


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{i} is not JSON (a line cut by a crash?); skipped", file=sys.stderr)
    return records


def _run_config(run_dir: Path) -> dict[str, Any]:
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.is_file():
        return yaml.safe_load(hydra_cfg.read_text()) or {}
    return {}


def sync(
    run_dir: Path,
    *,
    offline: bool,
    project: str | None,
    entity: str | None,
    name: str | None,
    run_id: str | None,
) -> Path | None:
    """Replay ``run_dir/metrics.jsonl`` into one W&B run; returns the offline folder (offline mode)."""
    import wandb

    records = _read_records(run_dir / "metrics.jsonl")
    config = _run_config(run_dir)
    wb = (config.get("logging") or {}).get("wandb") or {}
    run = wandb.init(
        project=project or wb.get("project") or "moetrain",
        entity=entity or wb.get("entity"),
        name=name or wb.get("name") or run_dir.name,
        tags=list(wb.get("tags") or []) or None,
        dir=str(run_dir),
        mode="offline" if offline else "online",
        config=config,
        id=run_id or secrets.token_hex(4),
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
    for record in records:
        run.log(flatten(record), step=int(record["step"]))
    folder = Path(run.dir).parent if offline else None
    run.finish()
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moetrain.tracking.wandb_sync",
        description="Upload a run's whole metrics.jsonl to W&B as one run (a resumed run included).",
    )
    p.add_argument("run_dir", type=Path, help="the run folder (holds metrics.jsonl)")
    p.add_argument("--offline", action="store_true", help="write one offline run folder instead of uploading")
    p.add_argument("--project", help="W&B project (default: the run's logging.wandb.project)")
    p.add_argument("--entity", help="W&B entity (default: the run's logging.wandb.entity)")
    p.add_argument("--name", help="W&B run name (default: the run's logging.wandb.name or folder name)")
    p.add_argument("--id", dest="run_id", help="W&B run id (default: a new one)")
    a = p.parse_args(argv)
    if not (a.run_dir / "metrics.jsonl").is_file():
        print(f"error: {a.run_dir / 'metrics.jsonl'} not found; fix: pass the run folder of a training run")
        return 2
    if not a.offline and not _has_login():
        import os

        if not os.environ.get("WANDB_API_KEY"):
            print("error: no W&B API key; fix: `wandb login` (or WANDB_API_KEY), or pass --offline")
            return 2
    folder = sync(
        a.run_dir, offline=a.offline, project=a.project, entity=a.entity, name=a.name, run_id=a.run_id
    )
    if folder is not None:
        print(f"wrote {folder}; upload it with: wandb sync {folder}")
    else:
        print("uploaded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
