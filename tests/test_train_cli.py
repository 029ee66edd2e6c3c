"""``python -m moetrain.train``: launch problems stop at once with one ``error:`` line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetrain import train
from moetrain.config import ConfigError, train_config_from_dict


def run_train(
    tmp_path: Path, *overrides: str, env_extra: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["WANDB_MODE"] = "disabled"
    env.update(env_extra or {})
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moetrain.train",
            *overrides,
            f"hydra.run.dir={tmp_path / 'run'}",
            f"data.data_dir={tmp_path / 'data'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.perf_counter() - start


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "parts"),
    [
        (
            ("+experiment=mixtral_tiny", "parallel.ep_size=2"),
            ("parallel.ep_size=2", "single process", "torchrun --nproc_per_node=2", "scripts/train_local.sh"),
        ),
        # 141 B parameters: ~2 TiB of training state, more than any machine that runs these tests
        (("model=mixtral_8x22b",), ("model mixtral_8x22b needs about", "TiB per process", "available")),
        (
            ("+experiment=mixtral_tiny", "data.name=jsonl"),
            ("data.name='jsonl'", "did you mean data.name=json?"),
        ),
        (("+experiment=mixtral_tiny", "parallel.ep_size=two"), ("parallel.ep_size='two'", "expected int")),
    ],
    ids=["ep_size_one_process", "memory", "data_name_typo", "ep_size_type"],
)
def test_launch_errors_are_one_line_before_any_work(tmp_path, overrides, parts):
    proc, seconds = run_train(tmp_path, *overrides)
    line = one_error_line(proc)
    for part in parts:
        assert part in line, (part, line)
    assert not (tmp_path / "data").exists()  # no corpus, tokenizer or dataset work started
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert seconds < 60


def test_compile_without_a_compiler_is_one_line_before_any_work(tmp_path):
    """parallel.compile=true where inductor cannot build (here: CXX names no compiler) stops at launch,
    not at the first step after the data and model are built."""
    proc, seconds = run_train(
        tmp_path, "+experiment=mixtral_tiny", "parallel.compile=true", env_extra={"CXX": "/nonexistent/g++"}
    )
    line = one_error_line(proc)
    for part in ("parallel.compile=true", "needs a C++ compiler", "parallel.compile=false"):
        assert part in line, (part, line)
    assert not (tmp_path / "data").exists()
    assert seconds < 60


def test_memory_check_uses_the_machine_and_can_be_skipped(monkeypatch):
    import moetrain.plan as plan

    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(plan, "machine_memory", lambda *a: (2**20, "this machine has 1.00 MiB"))
    cfg = train_config_from_dict({})  # mixtral_small: ~100 MiB of fp32 training state
    with pytest.raises(ConfigError, match="needs about .* MiB per process .* but this machine has 1.00 MiB"):
        train.check_launch(cfg)
    cfg.parallel.check_memory = False
    train.check_launch(cfg)
    monkeypatch.setattr(plan, "machine_memory", lambda *a: (2**40, "plenty"))
    cfg.parallel.check_memory = True
    train.check_launch(cfg)


def test_world_size_comes_from_the_launcher(monkeypatch):
    cfg = train_config_from_dict({"parallel": {"ep_size": 2, "check_memory": False}})
    # what torchrun exports to each of its processes
    for key, value in {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }.items():
        monkeypatch.setenv(key, value)
    train.check_launch(cfg)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="single process"):
        train.check_launch(cfg)
