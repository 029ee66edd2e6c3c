"""Each rank's own resumable state (data-loader position, RNG states) as JSON: no pickle.

``rank_state/rank_NNNNN.json`` holds ``{"loader": {...}, "rng": {...}}``; the RNG states are
integers (python's Mersenne Twister, numpy's) and base64 of torch's byte tensors, so the file
restores the exact streams and carries no code. Checkpoints written before hold the same content
in ``rank_NNNNN.pt`` pickles, read through ``safe_load`` (refused if they hold anything else).
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrain.checkpoint.safe_load import safe_torch_load

FOLDER = "rank_state"


def _bytes_of(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor_of(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """The global RNG streams of this process as JSON-able values."""
    version, mt, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "name": name,
            "key": [int(x) for x in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": _bytes_of(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _bytes_of(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (or the pickled form older checkpoints hold)."""
    py, npy, th = state["python"], state["numpy"], state["torch"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        np.random.set_state(
            (
                npy["name"],
                np.asarray(npy["key"], dtype=np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            )
        )
        torch.set_rng_state(_tensor_of(th))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_tensor_of(state["cuda"]))
        return
    random.setstate(py)  # pickled form (checkpoints before 2026-12)
    np.random.set_state(npy)
    torch.set_rng_state(th)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_rank_state(folder: Path, rank: int, loader: dict[str, Any]) -> Path:
    """This rank's loader position and RNG states; the loader state must be JSON-serialisable."""
    (folder / FOLDER).mkdir(exist_ok=True)
    path = folder / FOLDER / f"rank_{rank:05d}.json"
    path.write_text(json.dumps({"loader": loader, "rng": rng_state()}))
    return path


def read_rank_state(folder: Path, rank: int, *, trust: bool = False) -> dict[str, Any] | None:
    """This rank's state, or None when the checkpoint has none for it (another layout). A stray
    ``.pt`` beside a ``.json`` is never read."""
    path = folder / FOLDER / f"rank_{rank:05d}.json"
    if path.is_file():
        return json.loads(path.read_text())
    legacy = folder / FOLDER / f"rank_{rank:05d}.pt"
    if legacy.is_file():
        return safe_torch_load(legacy, trust=trust)
    return None
