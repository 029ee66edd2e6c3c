"""Sharded safetensors files written and read in one pass, hashed on the way.

The files are ordinary safetensors (8-byte header length, JSON header, raw little-endian data;
``safetensors.safe_open`` and transformers read them). moetrain writes them itself, tensor by
tensor, because ``safetensors.save_file`` cannot report a digest: hashing afterwards would read
every byte a second time. Reading works the same way: the one rank that verifies a file reads it
sequentially once, hashing every byte and keeping the tensors it needs; other ranks read only the
byte ranges of their tensors (``read_tensors``).

The index next to the shards (``model.safetensors.index.json``: ``weight_map`` tensor name -> file
name) is transformers' sharded-checkpoint index.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@dataclass
class Written:
    file: str
    bytes: int
    sha256: str
    names: list[str]


def write_shard(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> Written:
    """Write ``tensors`` (in this order) as one safetensors file, fsynced; return its size and
    SHA-256, computed from the bytes as they were written."""
    stream = ShardStream(path, [(name, t.dtype, tuple(t.shape)) for name, t in tensors], metadata)
    for name, t in tensors:
        stream.write(name, t)
    return stream.close()


class ShardStream:
    """``write_shard`` one tensor at a time, for tensors made one after another (a ZeRO save gathers
    each in turn): the names, dtypes and shapes come first (the header leads the file), then each
    tensor is written and hashed as it arrives, and its memory can be freed at once.

    A failure (a full disk, a tensor that is not what the header announced) is kept in ``error``
    and later tensors are dropped: the caller goes on (its collectives must) and ``close`` raises it."""

    def __init__(
        self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in entries:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
        self.path, self.bytes, self.names = path, 8 + len(head) + offset, [e[0] for e in entries]
        self._todo = iter(entries)
        self._hash = hashlib.sha256()
        self.error: Exception | None = None
        self._f: BinaryIO | None = None
        try:
            self._f = open(path, "wb")  # noqa: SIM115  (closed by close(), after the last tensor)
            self._put(struct.pack("<Q", len(head)))
            self._put(head)
        except Exception as e:
            self._fail(e)

    def _put(self, chunk: bytes | memoryview) -> None:
        assert self._f is not None
        self._f.write(chunk)
        self._hash.update(chunk)

    def _fail(self, e: Exception) -> None:
        self.error = e
        if self._f is not None:
            self._f.close()

    def write(self, name: str, t: torch.Tensor) -> None:
        if self.error is not None:
            return
        try:
            want = next(self._todo, None)
            got = (name, t.dtype, tuple(t.shape))
            if got != want:
                raise ValueError(f"{self.path.name}: {got} written where the header has {want}")
            self._put(_raw(t))
        except Exception as e:
            self._fail(e)

    def close(self) -> Written:
        if self.error is None and next(self._todo, None) is not None:
            self._fail(ValueError(f"{self.path.name}: closed before its last tensor"))
        if self.error is not None:
            raise self.error
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return Written(self.path.name, self.bytes, self._hash.hexdigest(), self.names)


def read_header(f: BinaryIO) -> tuple[int, dict[str, Any], bytes]:
    prefix = f.read(8)
    (n,) = struct.unpack("<Q", prefix)
    head = f.read(n)
    return 8 + n, json.loads(head), prefix + head


def _tensor_from(buf: bytearray, meta: dict[str, Any]) -> torch.Tensor:
    dtype = TORCH_DTYPES[meta["dtype"]]
    if not buf:
        return torch.empty(meta["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"])


def read_tensors(
    path: Path, wanted: set[str] | None, *, sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of ``path`` named in ``wanted`` (None: all). With ``sha256`` the whole file is
    read once, sequentially, and checked: returns ``(tensors, problem)`` where problem names the
    file when its digest differs. Without it only the wanted byte ranges are read."""
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        start, header, head_bytes = read_header(f)
        items = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"),
            key=lambda kv: kv[1]["data_offsets"][0],
        )
        h = hashlib.sha256(head_bytes) if sha256 is not None else None
        for name, meta in items:
            begin, end = meta["data_offsets"]
            keep = wanted is None or name in wanted
            if h is None and not keep:
                continue
            if h is None:
                f.seek(start + begin)
            buf = bytearray(end - begin)
            f.readinto(buf)
            if h is not None:
                h.update(buf)
            if keep:
                out[name] = _tensor_from(buf, meta)
        if h is not None:
            h.update(f.read())  # anything after the last tensor (never, in a valid file)
            if h.hexdigest() != sha256:
                return out, f"{path}: contents differ from the manifest's SHA-256 (corrupted)"
    return out, None


def tensor_names(path: Path) -> list[str]:
    with open(path, "rb") as f:
        return [k for k in read_header(f)[1] if k != "__metadata__"]


def write_index(path: Path, weight_map: dict[str, str], total_size: int, extra: dict[str, Any]) -> None:
    """transformers' ``*.safetensors.index.json``."""
    body = {"metadata": {"total_size": total_size, **extra}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(body, indent=1))


def read_index(path: Path) -> dict[str, str]:
    return json.loads(path.read_text())["weight_map"]
