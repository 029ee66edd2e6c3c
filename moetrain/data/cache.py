"""Where data lives on disk, and how to write it there safely.

Everything the pipeline builds (corpus, tokenizer, tokenised arrays) is written into a temporary
sibling directory and moved into place with one ``os.replace``. A crash leaves no half-built entry,
and several processes building the same entry at once is safe: the first rename wins and the
others discard their copy, so no barrier is needed for correctness.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

TOKENIZED_VERSION = 1  # bump when tokenisation output changes: part of the tokenized and packed keys


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``data.data_dir``, else ``$MOETRAIN_DATA_DIR``, else ``~/.cache/moetrain``."""
    chosen = data_dir or os.environ.get("MOETRAIN_DATA_DIR") or Path.home() / ".cache" / "moetrain"
    return Path(chosen).expanduser().resolve()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Content hash of several files (names excluded, order included)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success move it to ``final`` in one step.

    On any exception the temporary directory is removed. If another process created ``final``
    meanwhile, its copy is kept and ours is dropped (both were built from the same inputs).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # a real failure, not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
