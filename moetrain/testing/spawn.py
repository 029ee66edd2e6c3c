"""``run_distributed``: a function on several gloo processes, in-process, with timeouts."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from moetrain.testing.process import free_port


# ---- in-process multi-process tests -----------------------------------------------------------------
def _distributed_worker(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple[Any, ...]
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    fn(rank, world_size, *args)  # an exception is recorded (with its traceback) by the spawn wrapper
    if dist.is_initialized():
        dist.barrier()  # every rank succeeded
    # Skip the interpreter's teardown: destroying gloo's threads while a peer exits can abort
    # ("terminate called without an active exception"), which would turn a pass into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    ``fn`` must be picklable (a module-level function). The env is set for ``init_process_group`` /
    ``moetrain.distributed.init_distributed`` (``MASTER_ADDR/PORT``, ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``); ``fn`` initialises the process group itself (gloo) and may raise to fail. The
    first failing rank's exception is raised here with its traceback (the others are terminated);
    if the ranks do not finish within ``timeout`` seconds (e.g. a collective hangs) they are killed
    and ``TimeoutError`` is raised."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.start_processes(
        _distributed_worker,
        args=(fn, world_size, port, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            raise TimeoutError(
                f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}) did not "
                f"finish in {timeout:.0f} s (a collective hanging?)"
            )
        if ctx.join(timeout=min(remaining, 1.0)):  # raises ProcessRaisedException / ProcessExitedException
            return
