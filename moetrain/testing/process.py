"""Training and other commands as subprocesses, offline, with their output on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

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
    # OpenMP threads that wait sleep instead of spinning. A training subprocess takes every core
    # (trainer/setup.py), and beside it run the other pytest worker's subprocess (`make test -n 2`) and
    # whatever else the host runs: spinning waiters then burn the cores the busy threads need. Two
    # concurrent 40-step mixtral_tiny runs on a loaded 2-core EPYC (2026-12-05): 47 s and 75 s
    # spinning, 25 s and 12 s passive; alone 13.7 / 27.7 s vs 11.7 / 12.0 s. Results are bit for bit
    # the same (only the waiting changes).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


def train_command(
    run_dir: str | os.PathLike,
    overrides: Iterable[str],
    nproc: int = 1,
    script: str | os.PathLike | None = None,
) -> list[str]:
    """The command line of a training run: ``-m moetrain.train``, or ``script`` (a stand-in entry that
    takes the same arguments, e.g. tests/_faulty_train.py) when given."""
    entry = ["-m", "moetrain.train"] if script is None else [str(script)]
    if nproc == 1:
        cmd = [sys.executable, *entry]
    else:
        # --standalone: a local c10d rendezvous on a free port, chosen by torchrun itself.
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *entry,
        ]
    return [*cmd, *overrides, f"hydra.run.dir={Path(run_dir)}"]


def run_train(
    run_dir: str | os.PathLike,
    *overrides: str,
    nproc: int = 1,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    script: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Train in a subprocess (``nproc`` > 1: torchrun on this host); returns the finished process.

    ``env`` adds to / replaces variables of :func:`offline_env`; ``script`` replaces ``-m moetrain.train``
    (see :func:`train_command`)."""
    cmd = train_command(run_dir, overrides, nproc, script)
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


def run_tool_in_process(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module *args`` for moetrain's command-line tools (export, generate, analyze) run in
    this process, through their ``main(argv)``: the result of :func:`run_command` (exit code, stdout,
    stderr) without the ~5 s a new interpreter spends importing torch and transformers.

    For tools only, never training (Hydra and torch.distributed keep process-wide state). During the
    call the offline variables of :func:`offline_env` are set (HTTP goes to a dead proxy), and
    ``DS_ACCELERATOR=cpu`` on a machine without CUDA, as the tools' ``__main__`` sets it."""
    import contextlib
    import importlib
    import io

    from moetrain.cli import quiet_cpu_accelerator

    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update({k: v for k, v in offline_env().items() if k not in ("PYTHONPATH",)})
        quiet_cpu_accelerator()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = importlib.import_module(module).main(list(args))
            except SystemExit as e:  # argparse errors exit 2
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["python", "-m", module, *args], code, out.getvalue(), err.getvalue())
