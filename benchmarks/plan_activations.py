"""Activation memory of one training micro-batch on this CPU, measured, next to plan's estimate.

    python benchmarks/plan_activations.py [--dtype fp32|bf16] [--batch 8] [--seq 256] [--ckpt] [k=v model overrides]

Two measurements of one forward + backward of mixtral_small (model overrides as ``key=value``):
``saved``: the bytes autograd stores for backward (every tensor packed by a saved-tensor hook, each
storage once, parameters excluded; without activation checkpointing only), and ``peak``: the rise of
this process's peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) over the
forward + backward, gradients already allocated by a warm-up step. plan's ``activations`` is the peak
it predicts; ``stored`` its part that autograd holds.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
from pathlib import Path

import torch

from moetrain.config import model_config_from_dict
from moetrain.model.transformer import MoETransformer
from moetrain.plan.activations import activation_memory

_LIBC = ctypes.CDLL("libc.so.6")


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    out = model(ids, labels_BT=ids)
    out.loss.backward()


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels_BT=ids)
    total = sum(seen.values())
    out.loss.backward()
    return total


def measure(overrides: dict, batch: int, seq: int, dtype: str, ckpt: bool) -> dict:
    torch.manual_seed(0)
    cfg = model_config_from_dict({"vocab_size": 8192, "max_seq_len": seq, **overrides})
    model = MoETransformer(cfg).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.train()
    model.activation_checkpointing = ckpt
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    _step(model, ids)  # warm-up: gradients allocated, kernels cached
    _step(model, ids)
    gc.collect()
    _LIBC.malloc_trim(0)  # give freed heap pages back, so the rise below is this step's own
    base = _vm("VmRSS")
    _reset_peak()
    _step(model, ids)
    peak = _vm("VmHWM") - base
    stored = None if ckpt else saved_bytes(model, ids)
    plan = activation_memory(cfg, micro_batch_size=batch, seq_len=seq, dtype=dtype, checkpointing=ckpt)
    return {
        "dtype": dtype,
        "batch": batch,
        "seq_len": seq,
        "checkpointing": ckpt,
        "measured_peak": peak,
        "measured_saved": stored,
        "plan_activations": plan["total"],
        "plan_stored": plan["stored"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    over = {}
    for kv in a.overrides:
        k, v = kv.split("=", 1)
        over[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
    print(json.dumps(measure(over, a.batch, a.seq, a.dtype, a.ckpt)))


if __name__ == "__main__":
    main()
