"""A regular (non-editable) install runs: the configs ship inside the package."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain import CONFIG_DIR

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def test_configs_live_in_one_place() -> None:
    assert CONFIG_DIR == ROOT / "moetrain" / "configs"
    assert (CONFIG_DIR / "train.yaml").is_file() and (CONFIG_DIR / "plan.yaml").is_file()


def test_top_level_configs_is_the_packaged_tree() -> None:
    """The top-level configs/ (the layout users expect) is a relative link to the packaged tree, so
    there is one copy: an edit through either path is the wheel's config."""
    top = ROOT / "configs"
    assert top.is_symlink(), "configs/ must be a link to moetrain/configs, not a copy"
    assert os.readlink(top) == "moetrain/configs", "a relative link survives clones and moves"
    assert top.resolve() == CONFIG_DIR
    assert sorted(p.relative_to(top).as_posix() for p in top.rglob("*.yaml")) == sorted(
        p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml")
    )
    tracked = subprocess.run(
        ["git", "ls-files", "-s", "configs"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if tracked.returncode == 0 and tracked.stdout:  # a git checkout (not an unpacked sdist)
        assert tracked.stdout.split()[0] == "120000", "git must store configs as a symlink (mode 120000)"


def test_package_data_covers_every_config() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "moetrain"
    ]
    package = ROOT / "moetrain"
    files = [p.relative_to(package).as_posix() for p in CONFIG_DIR.rglob("*") if p.is_file()]
    assert files
    missed = [
        f
        for f in files
        if not any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns)
    ]
    assert not missed, f"not shipped in the wheel (pyproject package-data): {missed}"


@pytest.mark.slow
def test_wheel_installed_outside_the_repo_runs(tmp_path: Path) -> None:
    # Build from a copy of the sources so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "moetrain", src / "moetrain", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(wheels)],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = wheels.glob("moetrain-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300
    )

    work = tmp_path / "elsewhere"  # not the repository: nothing can come from the checkout
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "disabled"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )

    where = run("-c", "import moetrain; print(moetrain.__file__)")
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr

    plan = run("-m", "moetrain.plan", "model=mixtral_8x7b", "plan.format=json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["total_params"] == 46_702_792_704

    assert run("-m", "moetrain.train", "--help").returncode == 0
    run_dir = tmp_path / "run"
    train = run(
        "-m",
        "moetrain.train",
        "+experiment=mixtral_tiny",
        "data=fixture",
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
        f"data.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
    )
    assert train.returncode == 0, train.stderr[-2000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r][-1] == 2
