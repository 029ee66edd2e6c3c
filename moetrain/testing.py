"""Helpers for moetrain's own tests: run training as a subprocess and read its outputs, and run a
function on several gloo processes in-process.

Not imported by the package itself; ``import moetrain.testing`` pulls in only the standard library
and torch.

- ``run_train(run_dir, *overrides, nproc=1)``: ``python -m moetrain.train`` (or ``torchrun --standalone
  --nproc_per_node=N``) with ``hydra.run.dir=run_dir``, offline (no network: ``HF_HUB_OFFLINE=1`` and an
  HTTP proxy that refuses connections, so any HTTP attempt fails loudly), returning the
  ``CompletedProcess``.
- ``cached_run(*overrides, nproc=1)``: the same, memoised per test session, so test modules can share
  an expensive reference run (its run dir lives in a session temp dir).
- ``read_metrics(run_dir)`` / ``metric_by_step(run_dir, key)``: the run's ``metrics.jsonl``.
- ``tiny_model_config(**overrides)``: a small validated ``ModelConfig`` for unit tests.
- ``run_distributed(fn, world_size, *args)``: ``fn(rank, world_size, *args)`` on ``world_size``
  spawned processes with the torch.distributed env set (free port); a failure in any rank raises in
  the parent with that rank's traceback, and a hang raises ``TimeoutError``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# Overrides that make a run fast and quiet: no progress bar, no W&B, no end-of-run sample.
FAST_OVERRIDES: tuple[str, ...] = (
    "logging.progress=false",
    "logging.wandb.mode=disabled",
    "trainer.sample_tokens=0",
)

# Any HTTP(S) request through this proxy fails at once (port 9 = discard, nothing listens).
DEAD_PROXY = "http://127.0.0.1:9"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge_overrides(*groups: Iterable[str]) -> list[str]:
    """Concatenate Hydra overrides; a later ``key=value`` replaces an earlier one for the same key
    (Hydra itself rejects the same key twice)."""
    out: dict[str, str] = {}
    for group in groups:
        for item in group:
            key = item.split("=", 1)[0]
            out.pop(key, None)
            out[key] = item
    return list(out.values())


def offline_env(extra: dict[str, str] | None = None, nproc: int = 1) -> dict[str, str]:
    """The environment for a training subprocess: no network, no inherited W&B mode or launcher vars."""
    env = dict(os.environ)
    for key in (
        "WANDB_MODE",
        "WANDB_API_KEY",
        "no_proxy",
        "NO_PROXY",
        # a test process may itself run under a launcher: don't leak its rank/world into the child
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        env.pop(key, None)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        WANDB_SILENT="true",
        http_proxy=DEAD_PROXY,
        https_proxy=DEAD_PROXY,
        HTTP_PROXY=DEAD_PROXY,
        HTTPS_PROXY=DEAD_PROXY,
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env


def run_command(
    cmd: list[str], *, env: dict[str, str], timeout: float, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout the whole group (launcher + workers) is killed
    and ``subprocess.TimeoutExpired`` raised with the output so far."""
    proc = subprocess.Popen(
        cmd,
        cwd=str(cwd),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_command(run_dir: str | os.PathLike, overrides: Iterable[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        cmd = [sys.executable, "-m", "moetrain.train"]
    else:
        # --standalone: a local c10d rendezvous on a free port, chosen by torchrun itself.
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "moetrain.train",
        ]
    return [*cmd, *overrides, f"hydra.run.dir={Path(run_dir)}"]


def run_train(
    run_dir: str | os.PathLike,
    *overrides: str,
    nproc: int = 1,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Train in a subprocess (``nproc`` > 1: torchrun on this host); returns the finished process.

    ``env`` adds to / replaces variables of :func:`offline_env`."""
    cmd = train_command(run_dir, overrides, nproc)
    return run_command(cmd, env=offline_env(env, nproc), timeout=timeout)


def describe(proc: subprocess.CompletedProcess, tail: int = 4000) -> str:
    """The command and the end of its output, for assertion messages."""
    cmd = " ".join(str(c) for c in proc.args) if isinstance(proc.args, list) else str(proc.args)
    return (
        f"command: {cmd}\nexit code: {proc.returncode}\n"
        f"--- stdout (tail) ---\n{(proc.stdout or '')[-tail:]}\n--- stderr (tail) ---\n{(proc.stderr or '')[-tail:]}"
    )


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError("training run failed\n" + describe(proc))
    return proc


# ---- runs shared by several tests in one session ----------------------------------------------------
@dataclass(frozen=True)
class TrainRun:
    run_dir: Path
    proc: subprocess.CompletedProcess
    seconds: float

    @property
    def ok(self) -> bool:
        return self.proc.returncode == 0

    def check(self) -> TrainRun:
        check_ok(self.proc)
        return self

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir)

    def by_step(self, key: str = "loss") -> dict[int, float]:
        return metric_by_step(self.run_dir, key)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"


_CACHE: dict[tuple[tuple[str, ...], int], TrainRun] = {}
_ROOT: Path | None = None


def session_dir() -> Path:
    """A temp dir for this process's cached runs, removed at exit (``MOETRAIN_TEST_KEEP=1`` keeps it)."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="moetrain-test-runs-"))
        if not os.environ.get("MOETRAIN_TEST_KEEP"):
            atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def cached_run(*overrides: str, nproc: int = 1, timeout: float = 300, name: str = "run") -> TrainRun:
    """``run_train`` once per distinct (overrides, nproc) per session; later calls return the same run.

    A failed run is cached too (tests sharing it all fail, with its output, without re-running)."""
    key = (tuple(overrides), nproc)
    if key not in _CACHE:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=session_dir()))
        start = time.time()
        proc = run_train(run_dir, *overrides, nproc=nproc, timeout=timeout)
        _CACHE[key] = TrainRun(run_dir, proc, time.time() - start)
    return _CACHE[key]


# ---- outputs ----------------------------------------------------------------------------------------
def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (one dict per logged step), in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def metric_by_step(run_dir: str | os.PathLike, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` for the records that have ``key`` (a resumed run's later record wins)."""
    return {int(r["step"]): r[key] for r in read_metrics(run_dir) if key in r}


def max_abs_diff(a: dict[int, float], b: dict[int, float], steps: Iterable[int] | None = None) -> float:
    steps = sorted(set(a) & set(b)) if steps is None else list(steps)
    if not steps:
        raise AssertionError("no common steps to compare")
    return max(abs(a[s] - b[s]) for s in steps)


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


# ---- the tiny experiment, shared by the trainer and distributed tests ------------------------------
# mixtral_tiny (fixture corpus, no download): 20 steps, micro-batch 4, eval and checkpoint every 10.
# global_batch aux scope makes a multi-process run equal a one-process run with the same global batch.
TINY_OVERRIDES: tuple[str, ...] = (
    "+experiment=mixtral_tiny",
    *FAST_OVERRIDES,
    "model.moe.aux_loss_scope=global_batch",
)


def tiny(*extra: str) -> list[str]:
    """mixtral_tiny overrides (fast, global_batch aux scope) plus ``extra`` (later keys win)."""
    return merge_overrides(TINY_OVERRIDES, extra)


def reference_run() -> TrainRun:
    """The one-process mixtral_tiny reference: 20 steps, global batch 4, W&B offline, a short sample
    at the end. (With one process, aux_loss_scope global_batch and micro_batch are the same.)"""
    return cached_run(
        *tiny("logging.wandb.mode=offline", "trainer.sample_tokens=8"), nproc=1, name="reference"
    )


TINY_MODEL = {
    "vocab_size": 97,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "ffn_hidden_size": 48,
    "num_experts": 4,
    "top_k": 2,
    "max_seq_len": 64,
}


def tiny_model_config(**overrides: Any):
    """A small, validated ``ModelConfig`` (hidden 32, 2 layers, 4 experts, top-2) for unit tests."""
    from moetrain.config import ModelConfig

    cfg = ModelConfig(**{**TINY_MODEL, **overrides})
    cfg.validate()
    return cfg
