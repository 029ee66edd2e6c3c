"""One run per run directory, and a full disk costs one line, never a checkpoint.

The run-dir lock (checkpoint/run_lock.py), the launch check of free space against the checkpoints
asked for, and failed saves on a small tmpfs (trainer.on_save_error=continue | stop)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetrain.checkpoint.model_file import CheckpointError
from moetrain.checkpoint.run_lock import LOCK_FILE, RunLock
from moetrain.testing import (
    cached_run,
    describe,
    metric_by_step,
    offline_env,
    read_metrics,
    run_train,
    tiny,
    train_command,
)

STEPS = ("trainer.max_steps=12", "trainer.checkpoint_every=4", "trainer.eval_every=0", "trainer.log_every=1")


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


# ---- the lock itself --------------------------------------------------------------------------------------
_HOLD = "import sys, time; from pathlib import Path; from moetrain.checkpoint.run_lock import RunLock; "
_HOLD += "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)"


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=offline_env()
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(CheckpointError) as e:
            RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and "trainer.force_unlock=true" in msg and "\n" not in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)
    warnings = lock.acquire()  # the kernel dropped the dead holder's lock; its file names it
    assert len(warnings) == 1 and f"pid {holder.pid}" in warnings[0] and "not running" in warnings[0]
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
    lock.release()


def test_force_unlock_takes_a_held_lock(tmp_path: Path):
    holder = _holder(tmp_path)
    try:
        forced = RunLock(tmp_path)
        assert any("force_unlock" in w and f"pid {holder.pid}" in w for w in forced.acquire(force=True))
        forced.release()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# ---- two launches on one run dir --------------------------------------------------------------------------
def _start(run_dir: Path, nproc: int, *extra: str) -> subprocess.Popen:
    cmd = train_command(run_dir, tiny(*STEPS, *extra), nproc, None)
    return subprocess.Popen(
        cmd,
        env=offline_env(None, nproc),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"training ended before step {step}: {proc.communicate()}"
        if (run_dir / "metrics.jsonl").is_file() and any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _signal_tree(pid: int, sig: int) -> None:
    """``sig`` to ``pid`` and all its descendants (torchrun starts its workers in sessions of their own)."""
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [1, 2])
def test_second_launch_on_a_busy_run_dir_stops_in_one_line(tmp_path: Path, nproc: int):
    extra = ("optim.micro_batch_size=2",) if nproc == 2 else ()
    alone = cached_run(*tiny(*STEPS, *extra), nproc=nproc, name="faults-ref").check()
    run = tmp_path / "run"
    first = _start(run, nproc, *extra)
    try:
        _wait_for_step(run, 2, first)
        _signal_tree(first.pid, signal.SIGSTOP)  # paused, still holding the lock: a busy run dir
        try:
            second = run_train(run, *tiny(*STEPS, *extra, "trainer.resume=auto"), nproc=nproc)
        finally:
            _signal_tree(first.pid, signal.SIGCONT)
        assert second.returncode != 0, describe(second)
        errors = _errors(second.stderr)
        assert len(errors) == 1 and "is in use by pid" in errors[0], describe(second)
        assert "trainer.force_unlock=true" in errors[0] and "hydra.run.dir" in errors[0]
        assert "moetrain: mixtral_tiny" not in second.stdout, "stopped before building anything"
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            _signal_tree(first.pid, signal.SIGKILL)
    assert first.returncode == 0, f"{out[-2000:]}\n{err[-2000:]}"
    got, want = metric_by_step(run), metric_by_step(alone.run_dir)
    assert sorted(got) == list(range(1, 13)), "metrics.jsonl is one history"
    assert all(got[s] == want[s] for s in want), (got, want)


# ---- a small filesystem ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:120]}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _small_disk_run(tmp_path: Path, size: str) -> tuple[Path, Path]:
    """A run dir on the normal disk whose checkpoints/ is a tmpfs of ``size`` (metrics stay readable)."""
    run = tmp_path / "run"
    run.mkdir()
    return run, tmp_path / "small"


@pytest.mark.slow
def test_launch_check_refuses_a_disk_too_small(tmp_path: Path):
    run, small = _small_disk_run(tmp_path, "4m")
    with _tmpfs(small, "4m"):
        (run / "checkpoints").symlink_to(small)
        proc = run_train(run, *tiny(*STEPS))  # keep_last=2: 3 checkpoints of ~3.7 MB
        assert proc.returncode == 2, describe(proc)
        errors = _errors(proc.stderr)
        assert len(errors) == 1 and "free" in errors[0] and "keep_last=2" in errors[0], describe(proc)
        assert "moetrain: mixtral_tiny" not in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_full_disk_with_continue_trains_on_and_reports_each_failure(tmp_path: Path):
    run, small = _small_disk_run(tmp_path, "6m")
    with _tmpfs(small, "6m"):
        (run / "checkpoints").symlink_to(small)
        proc = run_train(run, *tiny(*STEPS, "trainer.keep_last=1", "trainer.on_save_error=continue"))
        assert "Traceback" not in proc.stderr, describe(proc)
        assert "warning: " in proc.stdout and "free" in proc.stdout, "the launch check warns"
        out = proc.stdout + proc.stderr
        failed = [line for line in _errors(out) if "checkpoint of step" in line]
        assert [int(line.split("step ")[1].split()[0]) for line in failed] == [8, 12], describe(proc)
        assert all("latest stays step_00000004" in line and "free in" in line for line in failed), failed
        assert proc.returncode == 1, "the last save failed: non-zero"
        assert sorted(metric_by_step(run)) == list(range(1, 13)), "training reached max_steps"
        assert (small / "latest").read_text().strip() == "step_00000004"
        assert not list(small.glob(".tmp-*")), "no partial folder left"


@pytest.mark.slow
def test_full_disk_with_stop_exits_in_one_line(tmp_path: Path):
    run, small = _small_disk_run(tmp_path, "8m")
    with _tmpfs(small, "8m"):
        (run / "checkpoints").symlink_to(small)
        proc = _start(
            run, 1, "trainer.keep_last=1", "trainer.on_save_error=stop", "trainer.async_checkpoint=false"
        )
        try:
            deadline = time.time() + 240
            while not (small / "latest").is_file() and time.time() < deadline:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.02)
            free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
            (small / "filler").write_bytes(b"\0" * max(0, free - 1_000_000))  # another job fills the disk
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 1, f"{out[-2000:]}\n{err[-2000:]}"
        errors = _errors(out + err)
        assert len(errors) == 1 and "on_save_error=stop" in errors[0] and "No space left" in errors[0], errors
        assert "Traceback" not in err
        assert (small / "latest").read_text().strip() == "step_00000004"
        assert not list(small.glob(".tmp-*"))
