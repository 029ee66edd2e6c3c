"""Keep freed host memory in the process, so large CPU tensors are not page-faulted in on every step.

glibc's malloc serves any block above ``M_MMAP_THRESHOLD`` (at most 32 MiB) with a fresh ``mmap``
and unmaps it on free. Training allocates the same large tensors every step (activations, token
copies sorted by expert, logits: mixtral_small's [2048, 8192] fp32 logits are 64 MiB), so each one
is faulted in page by page and zeroed by the kernel again. Measured on a 2-core AMD EPYC: a fresh
64 MiB ``index_select`` took 20 ms against 2 ms into reused memory
(benchmarks/results/suite_epyc-avx512bf16_2026-12-01.md). jemalloc
and tcmalloc keep freed memory for reuse; this asks glibc to do the same: no mmap for large blocks
(``M_MMAP_MAX=0``) and no trimming of the heap top below 2 GiB (``M_TRIM_THRESHOLD``). The cost is
that the resident size stays at its peak instead of shrinking between steps.

``parallel.host_allocator``: ``retain`` (default) applies it to CPU training processes, where the
activations live in host memory; ``system`` leaves malloc as it is; CUDA runs keep malloc's defaults
(their large tensors are on the GPU). Elsewhere than glibc (macOS, musl) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from moetrain.config import HOST_ALLOCATORS

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_GLIBC_MMAP_MAX_DEFAULT = 65536
_TRIM_KEEP = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap top


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # Only glibc has gnu_get_libc_version (and mallopt with these meanings).
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def configure_host_allocator(mode: str) -> bool:
    """Apply ``mode`` (``retain`` | ``system``) to this process's malloc. Returns whether it took effect
    (False where malloc is not glibc's). ``system`` restores glibc's defaults for mmap use; the trim
    threshold stays fixed (glibc's own default is adaptive and cannot be restored by mallopt)."""
    if mode not in HOST_ALLOCATORS:
        raise ValueError(f"host allocator mode {mode!r}: one of {HOST_ALLOCATORS}")
    libc = _glibc()
    if libc is None:
        return False
    if mode == "retain":
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _TRIM_KEEP))
    return bool(libc.mallopt(M_MMAP_MAX, _GLIBC_MMAP_MAX_DEFAULT))
