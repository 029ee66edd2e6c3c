"""Checkpoint manifests: every file's size and SHA-256, written last, checked before loading.

A checkpoint folder without ``manifest.json`` was never completed (or predates manifests, see
``verify``); one whose files differ from it was damaged after the save (truncated copy, bit flip,
full disk). ``resume=auto`` then falls back to the newest intact checkpoint, and an explicit
``trainer.resume=PATH`` stops with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Hash every file of ``folder`` and write the manifest durably (fsync file and folder)."""
    entries = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in _files(folder)
    }
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify(folder: Path, *, hashes: bool = True) -> str | None:
    """None if the checkpoint is intact, else one line saying what is wrong (naming the file).

    A final-named folder without a manifest predates manifests (saves rename a folder only after
    its manifest is written, so an interrupted save never has a final name): accepted unverified."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest}: unreadable ({e})"
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != meta["bytes"]:
            return f"{path}: {size} bytes, the manifest says {meta['bytes']} (truncated or replaced)"
        if hashes and file_digest(path) != meta["sha256"]:
            return f"{path}: contents differ from the manifest's SHA-256 (corrupted)"
    return None
