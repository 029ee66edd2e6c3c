"""Pre-tokenized token files, memory-mapped: ``data.name=tokens data.data_files=...``.

Each file is a flat 1-D array of token ids; documents are separated by the tokenizer's EOS id (each
document is followed by EOS, the convention of OLMo-core's memmap dataset, Dolma's tokenizer and
Megatron's ``preprocess_data.py --append-eod``). Several files are read as one stream, in the order
given (globs sorted). Formats:

- ``.npy`` with NumPy's header (``np.save``, ``python -m moetrain.data.prepare``): the dtype comes
  from the header; 1-D, an unsigned or signed integer type;
- headerless raw files (``.bin``, and OLMo-core / Dolma ``.npy`` files, which carry no NumPy header):
  ``data.token_dtype`` says the dtype (OLMo-core's default is uint16; uint32 for vocabularies over 65,536);
- Megatron ``.bin`` with its ``.idx`` beside it: the dtype comes from the index header (its document
  boundaries are not read: documents must end with EOS, i.e. ``--append-eod``).

Nothing is read whole: blocks are sliced from ``np.memmap`` views when a batch asks for them.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrain.data.errors import DataError

NPY_MAGIC = b"\x93NUMPY"
MEGATRON_INDEX_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
META_FILE = "meta.json"  # written by moetrain.data.prepare next to its token files


def _megatron_dtype(bin_path: str) -> np.dtype | None:
    idx = os.path.splitext(bin_path)[0] + ".idx"
    if not os.path.isfile(idx):
        return None
    with open(idx, "rb") as f:
        head = f.read(len(MEGATRON_INDEX_MAGIC) + 9)
    if not head.startswith(MEGATRON_INDEX_MAGIC) or len(head) < len(MEGATRON_INDEX_MAGIC) + 9:
        raise DataError(f"{idx} is not a Megatron index (no MMIDIDX header); remove it or fix the file")
    code = head[len(MEGATRON_INDEX_MAGIC) + 8]
    if code not in MEGATRON_DTYPES:
        raise DataError(f"{idx}: unsupported Megatron token dtype code {code}")
    return np.dtype(MEGATRON_DTYPES[code])


def open_token_file(path: str, dtype: str | None) -> np.ndarray:
    """A read-only 1-D memmap of ``path`` (see the module docstring for the formats)."""
    if not os.path.isfile(path):
        raise DataError(f"token file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
    if magic == NPY_MAGIC:
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise DataError(f"token file {path} is not a readable .npy: {e}") from e
        if arr.ndim != 1 or arr.dtype.kind not in "ui":
            raise DataError(
                f"token file {path} holds a {arr.ndim}-D {arr.dtype} array: token files are 1-D integer "
                "arrays (uint16 / uint32) of document tokens, each document followed by EOS"
            )
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            raise DataError(
                f"data.token_dtype={dtype} but {path} is a {arr.dtype} .npy (its header says so); "
                "remove data.token_dtype"
            )
        return arr
    from_index = _megatron_dtype(path)
    if from_index is not None and dtype is not None and np.dtype(dtype) != from_index:
        raise DataError(f"data.token_dtype={dtype} but the Megatron index of {path} says {from_index}")
    chosen = from_index if from_index is not None else dtype
    if chosen is None:
        raise DataError(
            f"token file {path} has no NumPy header: set data.token_dtype (uint16 | uint32 | ...) to the "
            "dtype it was written with"
        )
    size = os.path.getsize(path)
    itemsize = np.dtype(chosen).itemsize
    if size == 0:
        raise DataError(f"token file {path} is empty")
    if size % itemsize:
        raise DataError(
            f"token file {path} has {size} bytes, not a multiple of {itemsize} ({np.dtype(chosen)}): "
            "wrong data.token_dtype?"
        )
    return np.memmap(path, dtype=chosen, mode="r")


def expand_files(data_files: Any) -> list[str]:
    """A path, glob, folder (its ``*.npy`` / ``*.bin``) or list of them -> existing files, in order."""
    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    files: list[str] = []
    for pattern in map(str, patterns):
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(pattern, "*.npy")) + glob.glob(os.path.join(pattern, "*.bin")))
        else:
            found = sorted(glob.glob(pattern, recursive=True))
        if not found:
            raise DataError(f"token file not found: {pattern}")
        files.extend(found)
    return files


class TokenStream:
    """Several token files as one flat read-only sequence (``len``, ``read(start, n)``)."""

    def __init__(self, files: list[str], dtype: str | None) -> None:
        self.files = files
        self.arrays = [open_token_file(f, dtype) for f in files]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])  # start of each file

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start + n)``, across file boundaries, as a new int64 array."""
        out = np.empty(n, dtype=np.int64)
        done = 0
        f = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while done < n:
            local = start + done - int(self.offsets[f])
            take = min(n - done, len(self.arrays[f]) - local)
            out[done : done + take] = self.arrays[f][local : local + take]
            done += take
            f += 1
        return out

    def locate(self, position: int) -> str:
        f = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return f"{self.files[f]} at token {position - int(self.offsets[f])}"


class TokenBlocks:
    """Blocks of ``seq_len + 1`` consecutive tokens of a stream (a ``BlockDataset``), from block
    ``first`` on; the partial last block is dropped. Every block has domain ``domain_id``.

    ``vocab_size``: a token id at or above it fails the batch with a one-line error (a file written
    with another tokenizer or read with the wrong dtype), checked on every batch (cheap)."""

    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        first: int = 0,
        count: int | None = None,
        domain_id: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        self.stream, self.block, self.first = stream, seq_len + 1, first
        available = len(stream) // self.block - first
        self.count = available if count is None else min(count, available)
        self.domain_id, self.vocab_size = domain_id, vocab_size

    @property
    def seq_len(self) -> int:
        return self.block - 1

    def __len__(self) -> int:
        return max(0, self.count)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.stream.read((self.first + int(i)) * self.block, self.block) for i in indices.tolist()]
        blocks = torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, self.block, dtype=torch.long)
        if self.vocab_size is not None and blocks.numel():
            top = int(blocks.max())
            if top >= self.vocab_size or int(blocks.min()) < 0:
                bad = int(indices[int((blocks.max(dim=1).values >= self.vocab_size).int().argmax())])
                raise DataError(
                    f"token id {top} in {self.stream.locate((self.first + bad) * self.block)} is outside the "
                    f"tokenizer's {self.vocab_size} ids: data.tokenizer is not the one that wrote these "
                    "files, or data.token_dtype is wrong"
                )
        return blocks, torch.full((len(rows),), self.domain_id, dtype=torch.long)


def token_datasets(
    data_files: Any,
    dtype: str | None,
    seq_len: int,
    validation_fraction: float,
    vocab_size: int,
    domain_id: int = 0,
) -> tuple[TokenBlocks, TokenBlocks, dict[str, Any]]:
    """(train, validation, stats). ``data_files`` with a ``validation`` key (or a prepare folder) gives
    the validation split its own files; otherwise the last ``validation_fraction`` of the blocks."""
    split_files = resolve_splits(data_files)
    train_stream = TokenStream(expand_files(split_files["train"]), dtype)
    stats: dict[str, Any] = {"tokens": {"train": len(train_stream)}, "files": train_stream.files}
    n_blocks = len(train_stream) // (seq_len + 1)
    if "validation" in split_files:
        val_stream = TokenStream(expand_files(split_files["validation"]), dtype)
        val = TokenBlocks(val_stream, seq_len, domain_id=domain_id, vocab_size=vocab_size)
        train = TokenBlocks(train_stream, seq_len, domain_id=domain_id, vocab_size=vocab_size)
        stats["tokens"]["validation"] = len(val_stream)
    else:
        n_val = max(1, round(validation_fraction * n_blocks)) if n_blocks >= 2 else 0
        train = TokenBlocks(train_stream, seq_len, 0, n_blocks - n_val, domain_id, vocab_size)
        val = TokenBlocks(train_stream, seq_len, n_blocks - n_val, n_val, domain_id, vocab_size)
    for split, blocks in (("train", train), ("validation", val)):
        if len(blocks) == 0:
            raise DataError(
                f"data.seq_len={seq_len} needs {seq_len + 1} tokens per block but the token files' {split} "
                f"split has too few tokens ({', '.join(blocks.stream.files[:3])}); lower data.seq_len or "
                "add files"
            )
    return train, val, stats


def resolve_splits(data_files: Any) -> dict[str, Any]:
    """``{train: files[, validation: files]}`` from a path / glob / list, a split mapping, or a folder
    written by ``moetrain.data.prepare`` (its train.npy and validation.npy)."""
    if isinstance(data_files, dict):
        unknown = set(data_files) - {"train", "validation"}
        if unknown or "train" not in data_files:
            raise DataError(
                f"data.data_files for tokens: keys must be train (required) and validation, got {sorted(data_files)}"
            )
        return dict(data_files)
    if isinstance(data_files, (str, os.PathLike)) and (Path(data_files).expanduser() / META_FILE).is_file():
        folder = Path(data_files).expanduser()
        return {"train": str(folder / "train.npy"), "validation": str(folder / "validation.npy")}
    return {"train": data_files}


def tokenizer_beside(data_files: Any) -> str | None:
    """The folder holding ``tokenizer.json`` next to the first train file (prepare writes one), or None."""
    try:
        first = expand_files(resolve_splits(data_files)["train"])[0]
    except DataError:
        return None
    folder = Path(first).parent
    return str(folder) if (folder / "tokenizer.json").is_file() else None


def write_npy(path: Path, chunks: Any, total: int, dtype: np.dtype, progress: Any = None) -> None:
    """Write ``total`` tokens from the int arrays ``chunks`` as a 1-D ``.npy``, atomically (temp file,
    then rename): a crash never leaves a half-written token file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
        pos = 0
        for chunk in chunks:
            out[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
            if progress is not None:
                progress(len(chunk))
        if pos != total:
            raise RuntimeError(f"wrote {pos} tokens to {path}, expected {total}")
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = ["TokenBlocks", "TokenStream", "open_token_file", "token_datasets", "write_npy"]
