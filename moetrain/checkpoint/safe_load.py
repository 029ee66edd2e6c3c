"""Reading the pickle files of checkpoints written before moetrain stopped writing any.

A pickle can name any importable function and have it called while loading (``__reduce__``): a
shared checkpoint would run its author's code on ``trainer.resume``. Checkpoints are therefore
written without pickles (safetensors and JSON); the few pickle files older checkpoints hold
(``rank_state/rank_NNNNN.pt``, ``optimizer_full.pt``, ``engine/``) are read with torch's restricted
unpickler (``weights_only=True``), which builds tensors, containers and numbers and the numpy types
allow-listed below (the global RNG state is a numpy array), and refuses everything else. A file it
refuses loads only with ``trainer.trust_checkpoint_code=true``, for a checkpoint the user made.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrain.checkpoint.model_file import CheckpointError

TRUST_KEY = "trainer.trust_checkpoint_code"


def _numpy_globals() -> list[Any]:
    """What ``np.random.get_state()`` pickles into: an array of uint32 (numpy 1.x and 2.x names)."""
    from numpy._core import multiarray as core_multiarray

    out: list[Any] = [
        np.ndarray,
        np.dtype,
        (core_multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        core_multiarray._reconstruct,
    ]
    for name in ("UInt32DType", "Int64DType", "Float64DType", "UInt8DType"):
        if hasattr(np.dtypes, name):
            out.append(getattr(np.dtypes, name))
    return out


def refused(path: Path, why: str = "") -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle holding more than tensors and numbers{why}: loading it could run code, so "
        f"moetrain refuses it; fix: only for a checkpoint you made yourself, set {TRUST_KEY}=true"
    )


def safe_torch_load(path: Path, *, trust: bool = False) -> Any:
    """``torch.load`` of an older checkpoint's pickle file through the restricted unpickler; with
    ``trust`` (the user vouches for the file) a refused file is unpickled in full."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        if not trust:
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise refused(path, f" (it names {found.group(1)})" if found else "") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _allowed_names() -> set[str]:
    names = set()
    for g in _numpy_globals():
        if isinstance(g, tuple):
            names.add(g[1])
        else:
            names.add(f"{g.__module__}.{g.__qualname__}")
    return names


def pickles_to_read(folder: Path) -> list[Path]:
    """The pickle files a resume from ``folder`` may read: an older checkpoint's rank states
    (where no JSON one stands beside), its optimizer_full.pt (without optimizer.safetensors) and
    DeepSpeed engine files. Any other ``*.pt`` in the folder is never read."""
    out = [
        p for p in sorted((folder / "rank_state").glob("rank_*.pt")) if not p.with_suffix(".json").is_file()
    ]
    has_optimizer = (folder / "optimizer.safetensors").is_file() or (
        folder / "optimizer.safetensors.index.json"
    ).is_file()
    if not has_optimizer and (folder / "optimizer_full.pt").is_file():
        out.append(folder / "optimizer_full.pt")
    if (folder / "engine").is_dir():
        out += sorted(p for p in (folder / "engine").rglob("*") if p.is_file() and p.suffix == ".pt")
    return out


def code_in_checkpoint(folder: Path, *, trust: bool = False) -> str | None:
    """None, or one line naming the first pickle file of ``folder`` that names a global beyond
    tensors, containers, numbers and the allow-listed numpy types (read from the pickle's opcodes:
    nothing is unpickled)."""
    if trust:
        return None
    allowed = _allowed_names()
    for path in pickles_to_read(folder):
        try:
            unsafe = [
                g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed
            ]
        except Exception as e:  # not a torch zip file at all
            return str(refused(path, f" (unreadable: {type(e).__name__})"))
        if unsafe:
            return str(refused(path, f" (it names {unsafe[0]})"))
    return None
