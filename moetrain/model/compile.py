"""``parallel.compile``: each transformer block through ``torch.compile`` (inductor), as torchtitan does.

Per block, not the whole model: the blocks share their graphs (same code, parameters as inputs; a
2-layer and a 4-layer model both compiled 4 graphs for training), so depth does not add compile time,
and the LM loss (model/lm_loss.py, a chunk loop that makes its gradients in the forward) stays eager.
Inside a block the token exchange and the experts run eager (``MoELayer.EAGER_UNDER_COMPILE``, wrapped
in ``torch.compiler.disable``): their GEMMs gain nothing from inductor, torch 2.13 has no fake kernel
for fp32 ``grouped_mm`` on CPU, MegaBlocks' CUDA ops are opaque to it, and the all-to-all needs its
split sizes on the host. What compiles is the rest: norms, attention, RoPE, residuals, the router, the
dispatch plan and the combine.

Decoding with a KV cache (generation, samples) runs the eager blocks: every new cache length would
be a new shape to compile. The compiled callables wrap the very same modules: parameter names, state
dicts and checkpoints do not change.

Measured on a 2-core AVX2 CPU (benchmarks/results/compile_epyc-avx2_2026-12-03.md): steps at most a few
per cent faster than eager there, inside the noise (the step is GEMM-bound), for 20-45 s of
compilation at the first step, so it is off by default; it is meant for GPUs, where the same
elementwise work is many small kernel launches.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why inductor cannot compile for this device here (None: it can). Asked before any expensive
    work: a missing compiler would otherwise surface at the first step, minutes in."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs triton on CUDA (pip install triton)"
    if device.type != "cpu":
        return f"no inductor backend for {device.type} here"
    from torch._inductor import config
    from torch._inductor.cpp_builder import cpp_compiler_search

    candidates = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    try:
        cpp_compiler_search(tuple(candidates))
    except Exception:  # noqa: BLE001 - inductor's own InvalidCxxCompiler and friends
        return "inductor on CPU needs a C++ compiler (apt install g++)"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        return f"inductor on CPU needs Python's headers ({include}/Python.h; apt install python3-dev)"
    return None


def compile_blocks(model: torch.nn.Module) -> None:
    """Sets ``model.compiled_blocks``: one compiled callable per block of ``model.layers``
    (``torch.compile`` wraps, it copies nothing), each MoE layer's ``EAGER_UNDER_COMPILE`` kept eager.
    Call it after expert parallelism has swapped the exchanges in."""
    for layer in model.moe_layers:
        for name in layer.EAGER_UNDER_COMPILE:
            setattr(layer, name, torch.compiler.disable(getattr(layer, name)))
    model.compiled_blocks = [torch.compile(block) for block in model.layers]
