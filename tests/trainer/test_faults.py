"""Never lose a run: preemption signals, numeric faults, kill -9 inside a save, damaged checkpoints.

Every run here is mixtral_tiny on the fixture corpus (a few seconds of training). Comparisons of
loss curves between an interrupted-and-resumed run and an uninterrupted one are exact: a resume in
the same layout replays the same operations on the same shapes (tests/README.md, "Numerics")."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from moetrain.checkpoint import read_model_state
from moetrain.checkpoint.integrity import verify, write_manifest
from moetrain.testing import (
    cached_run,
    check_ok,
    describe,
    metric_by_step,
    offline_env,
    read_metrics,
    run_train,
    tiny,
    train_command,
)
from moetrain.trainer.guards import NonFiniteGuard, StopRequest, TrainingDiverged

STEPS = ("trainer.max_steps=12", "trainer.checkpoint_every=4", "trainer.eval_every=0", "trainer.log_every=1")


def _uninterrupted(*extra: str, nproc: int = 1):
    """The uninterrupted 12-step run (shared by the tests of this module within a session)."""
    return cached_run(*tiny(*STEPS, *extra), nproc=nproc, name="faults-ref").check()


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.communicate()}")
        if metrics.is_file() and any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _interrupt(run_dir: Path, at_step: int, sig: int, *extra: str, nproc: int = 1) -> tuple[int, str, str]:
    cmd = train_command(run_dir, tiny(*STEPS, *extra), nproc, None)
    proc = subprocess.Popen(
        cmd, env=offline_env(None, nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(run_dir, at_step, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])  # SIGUSR1/SIGINT: test_stop_request
def test_signal_saves_and_resume_gives_the_same_curve(tmp_path: Path, sig: int):
    reference = metric_by_step(_uninterrupted().run_dir)
    run = tmp_path / "preempted"
    code, out, err = _interrupt(run, 3, sig)
    name = signal.Signals(sig).name
    assert code == 0, f"{code}\n{out[-3000:]}\n{err[-3000:]}"
    assert f"{name} received" in err
    assert "stopped at step" in out and name in out, out[-2000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    stop_step = int(latest.split("_")[1])
    assert 3 <= stop_step < 12, latest
    check_ok(run_train(run, *tiny(*STEPS, "trainer.resume=auto")))
    resumed = metric_by_step(run)
    assert sorted(resumed) == list(range(1, 13))
    for s in range(1, 13):  # same layout, same operations: bit for bit
        assert resumed[s] == reference[s], (s, resumed[s], reference[s])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_torchrun_with_expert_parallelism(tmp_path: Path):
    """Kubernetes / torchrun: the launcher gets SIGTERM and forwards it to both ranks, which stop
    after the same step with one complete checkpoint; the resumed run equals an uninterrupted one."""
    ep2 = ("optim.micro_batch_size=2", "parallel.ep_size=2")
    reference = metric_by_step(_uninterrupted(*ep2, nproc=2).run_dir)
    run = tmp_path / "preempted"
    _code, out, err = _interrupt(run, 3, signal.SIGTERM, *ep2, nproc=2)
    # torchrun's own exit code reports that it was signalled; the ranks exited 0 after saving.
    assert "SIGTERM received" in err, err[-3000:]
    assert "stopped at step" in out, out[-3000:]
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert (latest / "manifest.json").is_file()
    # ZeRO-0 fp32: the layout-free files are the whole state; every rank's RNG and loader position too.
    assert (latest / "optimizer.safetensors.index.json").is_file() and not (latest / "engine").exists()
    assert sorted(p.name for p in (latest / "rank_state").iterdir()) == ["rank_00000.json", "rank_00001.json"]
    check_ok(run_train(run, *tiny(*STEPS, *ep2, "trainer.resume=auto"), nproc=2))
    resumed = metric_by_step(run)
    for s in range(1, 13):
        assert resumed[s] == reference[s], (s, resumed[s], reference[s])


@pytest.mark.slow
def test_nan_step_is_skipped_and_never_saved(tmp_path: Path):
    run = tmp_path / "nan"
    proc = run_train(run, *tiny(*STEPS), env={"MOETRAIN_TEST_NAN_AT_STEP": "3,6"})
    check_ok(proc)
    assert "non-finite loss at step 3: update skipped" in proc.stdout, describe(proc)
    records = {r["step"]: r for r in read_metrics(run)}
    assert records[3]["skipped_step"] == 1 and records[6]["skipped_steps_total"] == 2
    assert records[4]["skipped_step"] == 0
    # Training went on from finite weights: every later loss is finite and the run ends normally.
    assert all(records[s]["loss"] == records[s]["loss"] for s in range(7, 13))
    for ckpt in (run / "checkpoints").glob("step_*"):
        weights = read_model_state(ckpt)
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt


@pytest.mark.slow
def test_nan_beyond_the_policy_stops_with_one_line(tmp_path: Path):
    run = tmp_path / "diverged"
    proc = run_train(
        run,
        *tiny(*STEPS, "trainer.max_skipped_steps=1"),
        env={"MOETRAIN_TEST_NAN_AT_STEP": "5,6"},
    )
    assert proc.returncode == 3, describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "at step 6" in errors[0], describe(proc)
    assert "Traceback" not in proc.stderr
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    weights = read_model_state(latest)
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["files", "renamed"]
)  # before / after the rename ("manifest": same as files)
def test_kill_9_inside_a_save_resumes_from_the_previous_checkpoint(tmp_path: Path, point: str):
    run = tmp_path / "killed"
    proc = run_train(run, *tiny(*STEPS), env={"MOETRAIN_TEST_KILL_IN_SAVE": f"{point}@8"})
    assert proc.returncode == -signal.SIGKILL, describe(proc)
    resumed = run_train(run, *tiny(*STEPS, "trainer.resume=auto"))
    check_ok(resumed)
    # Killed before the rename: step 8 never existed, resume from 4. After the rename (latest still
    # on 4 or already on 8): either is intact, and the resume says which.
    expected = "step_00000004" if point in ("files", "manifest") else "step_0000000"
    assert "taking over the run-dir lock left by pid" in resumed.stdout, describe(resumed)
    assert f"resumed from {run / 'checkpoints' / expected}" in resumed.stdout, describe(resumed)
    assert sorted(metric_by_step(run)) == list(range(1, 13))


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["bitflip"])  # truncation and missing files: test_verify_names_the_damage
def test_damaged_checkpoint_falls_back_or_fails_in_one_line(tmp_path: Path, how: str):
    run = tmp_path / "damaged"  # a copy of the uninterrupted run's checkpoints (keep_last=2: steps 8, 12)
    shutil.copytree(_uninterrupted().checkpoints, run / "checkpoints")
    newest = run / "checkpoints" / "step_00000012"
    _damage(newest / "model-00001-of-00001.safetensors", how)
    # An explicit path is never replaced by another checkpoint: one line naming the file, exit 2.
    explicit = run_train(tmp_path / "other", *tiny(*STEPS, f"trainer.resume={newest}"))
    assert explicit.returncode == 2, describe(explicit)
    errors = [line for line in explicit.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "model-00001-of-00001.safetensors" in errors[0] and "damaged" in errors[0], (
        describe(explicit)
    )
    assert "Traceback" not in explicit.stderr
    # resume=auto walks back to the newest intact checkpoint and says what was wrong.
    resumed = run_train(run, *tiny(*STEPS, "trainer.resume=auto"))
    check_ok(resumed)
    assert f"warning: skipping checkpoint {newest}" in resumed.stdout, describe(resumed)
    assert f"resumed from {run / 'checkpoints' / 'step_00000008'}" in resumed.stdout


def test_run_dir_not_writable_fails_before_work(tmp_path: Path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; test_checkpoint_folder_unusable covers root")
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o500)
    proc = run_train(run, *tiny(*STEPS))
    assert proc.returncode == 2 and "not writable" in proc.stderr, describe(proc)


def test_checkpoint_folder_unusable_fails_before_work(tmp_path: Path):
    """Runs as any user (root included): a file where the checkpoint folder should be."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    proc = run_train(run, *tiny(*STEPS))
    assert proc.returncode == 2, describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "checkpoints is not writable" in errors[0], describe(proc)
    assert "moetrain: mixtral_tiny" not in proc.stdout, "failed before building the model"


@pytest.mark.slow
def test_resume_with_another_model_shape_is_one_line(tmp_path: Path):
    ckpt = _uninterrupted().step_dir(12)
    proc = run_train(tmp_path / "shape", *tiny(*STEPS, "model.num_layers=3", f"trainer.resume={ckpt}"))
    assert proc.returncode == 2, describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "model.num_layers: 2 -> 3" in errors[0], describe(proc)
    assert "size mismatch" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_checkpoint_holds_one_copy_of_weights_and_optimizer_state():
    """model.safetensors + optimizer.safetensors are the whole state (layout-free and exact);
    no second copy in DeepSpeed's engine files. Bound: 1.15 x (fp32 weights + AdamW's two moments),
    the 15 % covering tokenizer, RNG/loader state, config and manifest (~40 KB here, ~1 %)."""
    ckpt = _uninterrupted().step_dir(12)
    weights = sum(t.numel() * 4 for t in read_model_state(ckpt).values())
    total = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    assert not (ckpt / "engine").exists()
    assert total <= 1.15 * 3 * weights, f"{total} bytes for {weights} bytes of weights"


def test_verify_names_the_damage(tmp_path: Path):
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "a.bin").write_bytes(bytes(range(256)) * 10)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("hello")
    write_manifest(folder)
    assert verify(folder) is None
    _damage(folder / "a.bin", "bitflip")
    assert "a.bin: contents differ" in verify(folder)
    assert verify(folder, hashes=False) is None  # same size: only the hash sees a bit flip
    _damage(folder / "a.bin", "truncate")
    assert "a.bin: 1280 bytes, the manifest says 2560" in verify(folder)
    (folder / "sub" / "b.txt").unlink()
    (folder / "a.bin").write_bytes(bytes(range(256)) * 10)
    assert "b.txt: missing" in verify(folder)


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGINT", "SIGTERM"])
def test_stop_request_flags_a_signal_and_restores_handlers(name: str, capsys):
    sig = getattr(signal, name)
    before = signal.getsignal(sig)
    stop = StopRequest([name], stop_after_minutes=None)
    stop.install()
    try:
        assert stop.poll() is None
        os.kill(os.getpid(), sig)
        assert stop.poll() == name
        os.kill(os.getpid(), sig)  # a second one changes nothing but says so
        assert stop.count == 2 and stop.poll() == name
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) == before
    err = capsys.readouterr().err
    assert f"{name} received: stopping after this step" in err and "received again" in err


def test_stop_request_wall_clock():
    stop = StopRequest([], stop_after_minutes=1e-6)
    time.sleep(0.01)
    assert "stop_after_minutes" in stop.poll()


def test_nonfinite_guard_window():
    guard = NonFiniteGuard("skip", max_skips=2, window=10)
    assert "update skipped (1 of at most 2" in guard.on_fault(3, "non-finite loss")
    guard.on_fault(5, "non-finite loss")
    assert "(1 of at most 2" in guard.on_fault(20, "non-finite loss")  # 3 and 5 left the window
    guard.on_fault(21, "non-finite loss")
    with pytest.raises(TrainingDiverged, match="at step 22: 3 updates skipped"):
        guard.on_fault(22, "non-finite loss")
    with pytest.raises(TrainingDiverged, match="on_nonfinite=stop"):
        NonFiniteGuard("stop", 5, 10).on_fault(1, "non-finite loss")


@pytest.mark.slow
def test_train_log_has_a_line_per_logged_step():
    """A cluster log reader's view: Hydra's train.log holds the step lines and the checkpoint lines."""
    run = _uninterrupted()
    log = (run.run_dir / "train.log").read_text()
    for step in (1, 6, 12):
        assert f"step {step}/12 | loss " in log, log[-2000:]
    assert "checkpoint saved:" in log


@pytest.mark.slow
def test_expert_bias_is_in_metrics():
    """Aux-loss-free balancing: the bias of every MoE layer is logged next to the loads."""
    run = cached_run(
        *tiny("model.moe.bias_update_rate=0.01", "model.moe.aux_loss_weight=0", "trainer.max_steps=6"),
        name="bias-metrics",
    ).check()
    rec = run.metrics()[-1]
    assert len(rec["moe/layer_0/expert_bias"]) == 4
    assert rec["moe/layer_0/expert_bias_spread"] > 0  # six steps of +-u updates moved it
