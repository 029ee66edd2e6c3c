"""Collectives go through ``moetrain.distributed.comm``, which puts tensors on the group's
communication device (CUDA for NCCL): a CPU bookkeeping tensor handed to NCCL fails at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import moetrain
from moetrain.distributed import comm

COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "send",
    "recv",
    "barrier",
    "gather",
    "scatter",
}
PKG = Path(moetrain.__file__).parent
# Where raw collectives may appear, and why: comm.py is the device-aware layer; expert_parallel.py
# and its chunked variant chunked_exchange.py exchange activations that already live on the model's
# device (the all-to-all); the router's
# global-batch counts in moe/losses.py are built on the model's device too; testing/spawn.py is the CPU
# test harness (gloo only).
# plan/calibrate.py times the collectives themselves (bandwidth of a raw all-reduce / all-to-all).
ALLOWED = {
    "distributed/comm.py",
    "distributed/expert_parallel.py",
    "distributed/chunked_exchange.py",
    "moe/losses.py",
    "testing/spawn.py",
    "plan/calibrate.py",
}


def _raw_collective_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            if node.func.attr in COLLECTIVES and isinstance(base, ast.Name) and base.id == "dist":
                found.append(f"{path.relative_to(PKG)}:{node.lineno} dist.{node.func.attr}")
    return found


def test_no_raw_collectives_outside_the_comm_layer():
    offenders = []
    for path in PKG.rglob("*.py"):
        if str(path.relative_to(PKG)) not in ALLOWED:
            offenders += _raw_collective_calls(path)
    assert offenders == [], f"use moetrain.distributed.comm instead: {offenders}"


def test_the_scan_finds_a_raw_collective(tmp_path):
    """Negative control: the scanner itself sees a direct call."""
    bad = PKG / "_tmp_scan_probe.py"
    try:
        bad.write_text("import torch.distributed as dist\n\ndef f(t):\n    dist.all_reduce(t)\n")
        assert _raw_collective_calls(bad) == ["_tmp_scan_probe.py:4 dist.all_reduce"]
    finally:
        bad.unlink()


@pytest.mark.parametrize(
    ("backend", "expected"), [("nccl", "cuda"), ("cpu:gloo,cuda:nccl", "cuda"), ("gloo", "cpu")]
)
def test_comm_device_follows_the_backend(monkeypatch, backend, expected):
    monkeypatch.setattr(comm, "initialized", lambda: True)
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    dev = comm.comm_device()
    assert dev.type == expected
    if expected == "cuda":
        assert dev.index == 3  # this rank's device, not cuda:0


def test_bookkeeping_tensors_are_moved_to_the_comm_device(monkeypatch):
    """A CPU tensor handed to the helpers reaches the collective on the comm device (here 'meta'
    stands in for a CUDA device, which a CPU host does not have), as a copy."""
    seen = []
    monkeypatch.setattr(comm, "initialized", lambda: True)
    monkeypatch.setattr(comm, "comm_device", lambda group=None: torch.device("meta"))

    def fake_all_reduce(t, op=None, group=None):
        seen.append(t.device.type)

    monkeypatch.setattr(comm.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(comm.dist, "get_world_size", lambda group=None: 2)
    src = torch.ones(3)
    assert comm._on_comm(src, None).device.type == "meta"
    with pytest.raises(NotImplementedError):  # meta -> cpu cannot copy data back: expected here
        comm.all_reduce_sum(src)
    assert seen == ["meta"]  # the collective itself only ever saw the comm device


def test_helpers_are_identity_without_a_process_group():
    t = torch.arange(4.0)
    assert comm.all_reduce_sum(t) is t
    assert comm.any_rank(True) is True and comm.any_rank(False) is False
    assert torch.equal(comm.gather_to_first(t, None), t)
