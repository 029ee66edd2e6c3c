"""parallel.host_allocator: with ``retain`` a large tensor freed and allocated again reuses memory the
process already has (no page faults); with ``system`` glibc maps and faults it in every time."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

import pytest

from moetrain.config import ConfigError, ParallelConfig
from moetrain.trainer.host_memory import _glibc, configure_host_allocator

_PROBE = textwrap.dedent(
    """
    import resource, statistics, sys, torch
    from moetrain.trainer.host_memory import configure_host_allocator
    configure_host_allocator(sys.argv[1])
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    counts = []
    for _ in range(9):  # 64 MiB allocated, touched, freed; the first ones grow the heap (retain)
        before = faults()
        torch.empty(16 << 20).fill_(1.0)
        counts.append(faults() - before)
    print(statistics.median(counts[3:]))
    """
)


def _faults_per_allocation(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(float(out.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(
    _glibc() is None, reason="mallopt semantics are glibc's; elsewhere the setting is a no-op"
)
def test_retain_reuses_freed_memory_and_system_faults_it_in():
    pages = (64 << 20) // resource.getpagesize()
    retained = _faults_per_allocation("retain")
    system = _faults_per_allocation("system")
    # system: a fresh mmap per allocation, every page faulted in (16384 4-KiB pages; 32 where
    # transparent huge pages back malloc); retain: the freed block is reused, no faults.
    assert system >= min(pages, 32), system  # negative control: the default really faults
    assert retained <= system // 16, (retained, system)


def test_configure_returns_whether_it_applied():
    # "system" (glibc's mmap default) in this process: the suite's own malloc stays as it was
    assert configure_host_allocator("system") is (_glibc() is not None)
    with pytest.raises(ValueError, match="one of"):
        configure_host_allocator("jemalloc")


def test_bad_mode_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="parallel.host_allocator"):
        ParallelConfig(host_allocator="jemalloc").validate()
