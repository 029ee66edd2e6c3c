"""What every ``python -m moetrain.<command>`` process does alike."""

from __future__ import annotations

import atexit
import gc
import os


def skip_exit_collection() -> None:
    """Let the process end without CPython's last full garbage collection.

    A process that imported torch (with dynamo and sympy), transformers, datasets and DeepSpeed holds
    about half a million objects, and the collections CPython runs while shutting down walk them all:
    about 1.3 s of a 9 s ``mixtral_tiny`` run on a 2-core CPU
    (benchmarks/results/process_start_exit_epyc-avx2_2026-12-03.md). By
    the time atexit hooks run, our files are closed (checkpoints, metrics.jsonl, W&B are finished
    explicitly); logging and W&B flush in their own atexit hooks, which still run; the memory goes back
    to the OS either way. CPython never promised ``__del__`` for objects alive at exit.

    Call from ``if __name__ == "__main__"`` only: a library import must not change the interpreter's
    exit for its host (pytest, a notebook)."""
    atexit.register(gc.freeze)  # objects in the permanent generation are never collected


def quiet_cpu_accelerator() -> None:
    """On a machine without CUDA, tell DeepSpeed it runs on the CPU (``DS_ACCELERATOR=cpu``).

    transformers (5.25) imports DeepSpeed when it builds a model, and DeepSpeed's accelerator probe then
    logs "Setting accelerator to CPU ..." to stdout: noise in commands whose stdout is their result
    (export, generate, analyze). Training sets the same in ``moetrain.distributed.env``."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
