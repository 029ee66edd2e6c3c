"""What every ``python -m moetrain.<command>`` process does alike."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


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


def run_then_exit(main: Callable[[], object]) -> NoReturn:
    """Run a command's ``main`` and end the process as ``sys.exit`` would, minus the interpreter's
    finalization: non-daemon threads are joined, atexit handlers run (logging, W&B), stdout and stderr
    are flushed, then ``os._exit`` ends the process with ``main``'s exit code.

    Why (training): gloo's worker threads live as long as their process groups, and DeepSpeed's group
    globals keep those alive until the interpreter frees its modules; ``destroy_process_group`` does
    not stop them (measured: a rank's 8 gloo threads stay until the last reference goes). A worker
    that frees a tensor at that point takes the GIL from a finalizing interpreter, which kills the
    thread and aborts the process: "terminate called without an active exception", SIGABRT, a failed
    launch after a run that succeeded (pytorch/pytorch#190489; one two-rank run aborted so in three
    of four full test suites on 2 CPU cores, 2026-12-05/06). Nothing a run needs happens in
    finalization: its files are closed by then, and CPython does not promise ``__del__`` for objects
    alive at exit."""
    try:
        main()
        code: object = 0
    except SystemExit as e:  # sys.exit(n) in main, and Hydra's exit after an error it reported
        code = e.code
    threading._shutdown()  # type: ignore[attr-defined]  # what exit does first: join non-daemon threads
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe: nothing more to say
            stream.flush()
    os._exit(code or 0)


def quiet_cpu_accelerator() -> None:
    """On a machine without CUDA, tell DeepSpeed it runs on the CPU (``DS_ACCELERATOR=cpu``).

    transformers (5.25) imports DeepSpeed when it builds a model, and DeepSpeed's accelerator probe then
    logs "Setting accelerator to CPU ..." to stdout: noise in commands whose stdout is their result
    (export, generate, analyze). Training sets the same in ``moetrain.distributed.env``."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
