"""Loading a checkpoint never runs code from it (no pickle is written; old pickles are read only
through torch's restricted unpickler, or refused in one line).

A "code-running pickle" here is a torch.save'd object whose ``__reduce__`` calls ``os.system`` to
create a sentinel file: if any reader unpickled it in full, the file would appear."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from moetrain.checkpoint.integrity import MANIFEST, verify, write_manifest
from moetrain.checkpoint.model_file import CheckpointError
from moetrain.checkpoint.rank_state import read_rank_state, rng_state, set_rng_state
from moetrain.checkpoint.safe_load import code_in_checkpoint, safe_torch_load
from moetrain.testing import (
    REPO_ROOT,
    cached_run,
    check_ok,
    describe,
    metric_by_step,
    run_tool_in_process,
    run_train,
    tiny,
)

STEPS = ("trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.eval_every=0", "trainer.log_every=1")


class _RunsCode:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _plant(path: Path, sentinel: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"loader": {"position": 0}, "payload": _RunsCode(sentinel)}, path)


def _reseal(folder: Path) -> None:
    """What an attacker does after editing a checkpoint: recompute the manifest (a SHA-256 list)."""
    (folder / MANIFEST).unlink(missing_ok=True)
    write_manifest(folder)
    assert verify(folder) is None


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def _tool(module: str, *args: str) -> subprocess.CompletedProcess:
    """export / generate / analyze in this process: a code-running pickle they unpickled would run here
    and create the sentinel just the same."""
    return run_tool_in_process(module, *args)


# ---- unit level ---------------------------------------------------------------------------------------
def test_rng_state_is_json_and_restores_every_stream():
    import json

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(3)  # mid-stream, with numpy's cached gaussian
    np.random.standard_normal()
    state = json.loads(json.dumps(rng_state()))
    want = (random.random(), np.random.standard_normal(), torch.rand(4))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    got = (random.random(), np.random.standard_normal(), torch.rand(4))
    assert want[0] == got[0] and want[1] == got[1] and want[2].equal(got[2])


def test_old_pickled_rank_state_loads_through_the_restricted_unpickler(tmp_path: Path):
    (tmp_path / "rank_state").mkdir()
    old = {
        "loader": {"epoch": 0, "position": 7, "seed": 1},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    torch.save(old, tmp_path / "rank_state" / "rank_00000.pt")  # what moetrain wrote until 2026-12
    assert code_in_checkpoint(tmp_path) is None
    state = read_rank_state(tmp_path, 0)
    assert state["loader"]["position"] == 7
    set_rng_state(state["rng"])  # the pickled form still restores


def test_code_running_pickle_is_refused_without_running(tmp_path: Path):
    sentinel = tmp_path / "ran"
    _plant(tmp_path / "rank_state" / "rank_00000.pt", sentinel)
    problem = code_in_checkpoint(tmp_path)
    assert problem is not None and "rank_00000.pt" in problem and "trust_checkpoint_code=true" in problem
    assert "posix.system" in problem or "os.system" in problem
    with pytest.raises(CheckpointError, match="trust_checkpoint_code"):
        safe_torch_load(tmp_path / "rank_state" / "rank_00000.pt")
    with pytest.raises(CheckpointError, match="trust_checkpoint_code"):
        read_rank_state(tmp_path, 0)
    assert not sentinel.exists()
    # trusted (the user's own checkpoint): loaded in full, which is exactly what runs the code
    safe_torch_load(tmp_path / "rank_state" / "rank_00000.pt", trust=True)
    assert sentinel.exists()


def test_no_trust_remote_code_anywhere():
    """Every transformers loader in moetrain passes trust_remote_code=False; none passes True."""
    files = {p: p.read_text() for p in (REPO_ROOT / "moetrain").rglob("*.py")}
    src = "\n".join(files.values())
    assert "trust_remote_code=True" not in src
    # the one full unpickling: safe_load's, behind trainer.trust_checkpoint_code
    assert [p.name for p, text in files.items() if "weights_only=False" in text] == ["safe_load.py"]
    import re

    calls = re.findall(r"(?<!`)Auto\w+\.from_pretrained\((?:[^()]|\([^()]*\))*\)", src)
    assert calls and all("trust_remote_code=False" in c for c in calls), calls


# ---- whole runs -----------------------------------------------------------------------------------------
def _source(nproc: int):
    extra = ("optim.micro_batch_size=2",) if nproc == 2 else ()
    return cached_run(*tiny(*STEPS, *extra), nproc=nproc, name=f"safety-{nproc}").check()


@pytest.mark.slow
def test_stray_pickles_are_ignored_everywhere(tmp_path: Path):
    """A new checkpoint with a code-running pickle in every place an older one held a pickle and a
    stray *.pt beside its files: resume (explicit and auto), export, generate and analyze all work
    and read none of them."""
    sentinel = tmp_path / "ran"
    run = tmp_path / "run"
    shutil.copytree(_source(1).run_dir / "checkpoints", run / "checkpoints")
    ckpt = run / "checkpoints" / "step_00000008"
    for rel in ("rank_state/rank_00000.pt", "optimizer_full.pt", "stray.pt", "tokenizer/evil.pt"):
        _plant(ckpt / rel, sentinel)
    _reseal(ckpt)
    check_ok(run_train(tmp_path / "explicit", *tiny(*STEPS, "trainer.max_steps=9", f"trainer.resume={ckpt}")))
    check_ok(run_train(run, *tiny(*STEPS, "trainer.max_steps=9", "trainer.resume=auto")))
    check_ok(_tool("moetrain.export", str(ckpt), str(tmp_path / "hf")))
    check_ok(_tool("moetrain.generate", str(ckpt), "prompt=to be", "max_new_tokens=3"))
    check_ok(_tool("moetrain.analyze", str(ckpt)))
    assert not sentinel.exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [1, 2])
def test_code_running_pickles_stop_resume_in_one_line(tmp_path: Path, nproc: int):
    """An older-format checkpoint whose pickles carry code: every resume stops before any work with
    one error line naming the file and trainer.trust_checkpoint_code; nothing runs."""
    sentinel = tmp_path / "ran"
    src = _source(nproc)
    extra = ("optim.micro_batch_size=2",) if nproc == 2 else ()
    places = {
        "rank_state": lambda c: (c / "rank_state" / f"rank_0000{nproc - 1}.json").unlink(),
        "optimizer_full.pt": lambda c: (c / "optimizer.safetensors.index.json").unlink(),
        "engine/rank_00000.pt": lambda c: None,
    }
    if nproc == 2:  # the per-rank file is what differs between ranks: rank 1's alone is poisoned
        places = {"rank_state": places["rank_state"]}
    for i, (place, prepare) in enumerate(places.items()):
        run = tmp_path / f"run{i}"
        shutil.copytree(src.run_dir / "checkpoints", run / "checkpoints")
        ckpt = run / "checkpoints" / "step_00000008"
        prepare(ckpt)
        rel = f"rank_state/rank_0000{nproc - 1}.pt" if place == "rank_state" else place
        _plant(ckpt / rel, sentinel)
        _reseal(ckpt)
        how = [f"trainer.resume={ckpt}", "trainer.resume=auto"] if i == 0 else ["trainer.resume=auto"]
        for resume in how:
            proc = run_train(run, *tiny(*STEPS, *extra, "trainer.max_steps=9", resume), nproc=nproc)
            assert proc.returncode != 0, describe(proc)
            errors = _errors(proc)
            assert len(errors) == 1, describe(proc)
            assert Path(rel).name in errors[0] and "trainer.trust_checkpoint_code=true" in errors[0], errors
            # (torchrun itself prints a traceback when a worker exits non-zero: none of ours)
            assert not any("/moetrain/" in line for line in proc.stderr.splitlines() if "File " in line)
            assert "moetrain: mixtral_tiny" not in proc.stdout, "stopped before building anything"
        # export, generate, analyze never read these files: they work
        if i == 0 and nproc == 1:
            check_ok(_tool("moetrain.export", str(ckpt), str(tmp_path / "hf")))
            check_ok(_tool("moetrain.analyze", str(ckpt)))
    assert not sentinel.exists()


def _as_written_by_main_2026_12(ckpt: Path) -> None:
    """Rewrite a checkpoint's rank states the way moetrain wrote them until 2026-12 (torch.save of
    python / numpy / torch RNG objects), and reseal it."""
    from moetrain.checkpoint.rank_state import _tensor_of

    for js in sorted((ckpt / "rank_state").glob("rank_*.json")):
        state = read_rank_state(ckpt, int(js.stem.split("_")[1]))
        py, npy = state["rng"]["python"], state["rng"]["numpy"]
        rng = {
            "python": (py["version"], tuple(py["state"]), py["gauss"]),
            "numpy": (
                npy["name"],
                np.asarray(npy["key"], dtype=np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            ),
            "torch": _tensor_of(state["rng"]["torch"]),
        }
        torch.save({"loader": state["loader"], "rng": rng}, js.with_suffix(".pt"))
        js.unlink()
    _reseal(ckpt)


@pytest.mark.slow
def test_checkpoint_of_the_old_writer_resumes_bit_exactly(tmp_path: Path):
    src = _source(1)
    run = tmp_path / "run"
    shutil.copytree(src.run_dir / "checkpoints", run / "checkpoints")
    ckpt = run / "checkpoints" / "step_00000004"
    _as_written_by_main_2026_12(ckpt)
    assert not list(ckpt.rglob("*.json")) or not (ckpt / "rank_state" / "rank_00000.json").exists()
    proc = check_ok(run_train(tmp_path / "resumed", *tiny(*STEPS, f"trainer.resume={ckpt}")))
    assert f"resumed from {ckpt} at step 4" in proc.stdout, describe(proc)
    want, got = metric_by_step(src.run_dir), metric_by_step(tmp_path / "resumed")
    for s in range(5, 9):
        assert got[s] == want[s], (s, got[s], want[s])
