"""Weights & Biases: offline by default, online with a key or on request.

Upload an offline run later with ``python -m moetrain.tracking.wandb_sync RUN_DIR`` (one W&B run from
``metrics.jsonl``, also after resumes; see that module for why not ``wandb sync`` of the folders).

The API key is never written anywhere by us: wandb reads it from its own login or WANDB_API_KEY.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from moetrain.config import WandbConfig


class WandbRun:
    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any], enabled: bool = True) -> None:
        self.run = None
        if not enabled or cfg.mode == "disabled":
            return
        import wandb

        mode = cfg.mode
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_login()):
            print(
                "wandb: no API key found; logging offline instead (later: `wandb login`, then "
                f"`python -m moetrain.tracking.wandb_sync {run_dir}`)"
            )
            mode = "offline"
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            tags=list(cfg.tags) or None,
            dir=str(run_dir),
            mode=mode,
            config=config,
            resume="allow",
            id=_run_id(run_dir),
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        self.run.log(flatten(metrics), step=step)

    def log_image(self, key: str, figure: Any, step: int) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Image(figure)}, step=step)

    def alert(self, title: str, text: str) -> None:
        if self.run is None:
            return
        try:
            import wandb

            self.run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)
        except Exception:  # alerts need a server; offline runs keep the log line only
            pass

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def flatten(metrics: dict[str, Any]) -> dict[str, Any]:
    """W&B wants scalars: lists (expert fractions) become a per-expert breakdown, None is dropped."""
    flat: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, list):
            for i, x in enumerate(v):
                flat[f"{k}/{i}"] = x
        elif v is not None:
            flat[k] = v
    return flat


def _has_login() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _run_id(run_dir: Path) -> str:
    """Stable id per run folder, so a resumed run continues the same W&B run."""
    id_file = run_dir / ".wandb_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)
    id_file.write_text(run_id)
    return run_id
