"""Launch scripts under scripts/: syntax, dry-run command lines, and real two-"node" launches on
localhost with a stand-in training module (tests/_dist_probe.py) that only joins a gloo process group.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
PROBE = REPO / "tests" / "_dist_probe.py"
SHELL_SCRIPTS = sorted([*SCRIPTS.glob("*.sh"), *SCRIPTS.glob("*.sbatch")])
PROBE_LINE = re.compile(r"PROBE rank=(\d+) world_size=(\d+) local_rank=\S+ sum=(\d+)")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # keep the children on this interpreter and off any GPU/MPI discovery
    env.setdefault("PYTHON", sys.executable)
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("DRY_RUN", "HOSTFILE", "NO_SSH", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SCRIPT", "MODULE"):
        env.pop(k, None)
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )


def _probe_reports(out: str) -> dict[int, tuple[int, int]]:
    return {int(r): (int(w), int(s)) for r, w, s in PROBE_LINE.findall(out)}


def test_scripts_present_and_executable():
    names = {p.name for p in SHELL_SCRIPTS}
    assert {"train_local.sh", "train_multinode.sh", "two_node_localhost.sh", "slurm_train.sbatch"} <= names
    for p in SHELL_SCRIPTS:
        assert p.stat().st_mode & stat.S_IXUSR, f"{p.name} is not executable"
        text = p.read_text()
        assert text.startswith("#!/usr/bin/env bash"), p.name
        assert "set -euo pipefail" in text, p.name
    assert (SCRIPTS / "hostfile.example").is_file()


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    res = subprocess.run(
        ["shellcheck", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_multinode_dry_run_prints_deepspeed_command():
    res = _run(
        [str(SCRIPTS / "train_multinode.sh"), "+experiment=mixtral_tiny", "parallel.ep_size=2"],
        DRY_RUN="1",
        HOSTFILE=str(SCRIPTS / "hostfile.example"),
        GPUS_PER_NODE="8",
        NUM_NODES="2",
        WANDB_MODE="offline",
        WANDB_API_KEY="secret-value",
    )
    assert res.returncode == 0, res.stderr
    cmd = [line for line in res.stdout.splitlines() if line.startswith("+ ")]
    assert len(cmd) == 1, res.stdout
    cmd = cmd[0]
    assert re.search(r"\bdeepspeed\b", cmd)
    assert f"--hostfile {SCRIPTS / 'hostfile.example'}" in cmd
    assert "--num_gpus 8" in cmd and "--num_nodes 2" in cmd
    assert "--master_addr" in cmd and "--master_port 29500" in cmd
    assert cmd.endswith("--module moetrain.train +experiment=mixtral_tiny parallel.ep_size=2")
    # the environment file it would write: propagated variables, secrets redacted
    assert "WANDB_MODE=offline" in res.stdout
    assert "WANDB_API_KEY=<redacted>" in res.stdout and "secret-value" not in res.stdout
    assert f"PYTHONPATH={REPO}" in res.stdout


def test_multinode_dry_run_flag_and_no_ssh():
    res = _run(
        [str(SCRIPTS / "train_multinode.sh"), "--dry-run", "trainer.max_steps=3"],
        HOSTFILE=str(SCRIPTS / "hostfile.example"),
        NO_SSH="1",
        NODE_RANK="1",
        MASTER_ADDR="10.0.0.1",
        MASTER_PORT="29600",
    )
    assert res.returncode == 0, res.stderr
    cmd = next(line for line in res.stdout.splitlines() if line.startswith("+ "))
    assert "--no_ssh --node_rank 1" in cmd
    assert "--master_addr 10.0.0.1 --master_port 29600" in cmd
    assert cmd.endswith("--module moetrain.train trainer.max_steps=3")


def test_multinode_requires_hostfile_and_node_rank():
    res = _run([str(SCRIPTS / "train_multinode.sh"), "--dry-run"])
    assert res.returncode != 0 and "HOSTFILE" in res.stderr
    res = _run(
        [str(SCRIPTS / "train_multinode.sh"), "--dry-run"],
        HOSTFILE=str(SCRIPTS / "hostfile.example"),
        NO_SSH="1",
    )
    assert res.returncode != 0 and "NODE_RANK" in res.stderr


def test_local_dry_run():
    res = _run([str(SCRIPTS / "train_local.sh"), "--dry-run", "+experiment=mixtral_tiny"], NPROC="2")
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.strip().splitlines()[-1]
    assert (
        "-m torch.distributed.run --standalone --nproc_per_node 2 -m moetrain.train +experiment=mixtral_tiny"
        in cmd
    )


@pytest.mark.multiprocess
def test_local_two_processes():
    res = _run([str(SCRIPTS / "train_local.sh"), "a=1"], timeout=120, NPROC="2", SCRIPT=str(PROBE))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert _probe_reports(out) == {0: (2, 3), 1: (2, 3)}, out


def _fake_slurm(tmp_path: Path) -> Path:
    """scontrol/squeue/srun stand-ins: two 'nodes' (localhost, 127.0.0.1) on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\necho 127.0.0.1\n")
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 01:30:00\n")
    # srun: drop its own options, start one task per node with SLURM_NODEID set, fail if any fails
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        'while [[ "$1" == -* ]]; do shift; done\n'
        "pids=()\n"
        'for i in 0 1; do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done\n'
        "rc=0\n"
        'for p in "${pids[@]}"; do wait "$p" || rc=$?; done\n'
        "exit $rc\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_slurm_dry_run(tmp_path: Path):
    bin_dir = _fake_slurm(tmp_path)
    res = _run(
        ["bash", str(SCRIPTS / "slurm_train.sbatch"), "+experiment=mixtral_small"],
        DRY_RUN="1",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_JOB_ID="77",
        SLURM_JOB_NAME="t",
        SLURM_GPUS_PER_NODE="h100:4",
        MOETRAIN_ROOT=str(REPO),
        RUN_DIR=str(tmp_path / "run"),
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "hostfile.77").read_text() == "localhost slots=4\n127.0.0.1 slots=4\n"
    cmd = res.stdout.strip().splitlines()[-1]
    assert "--rdzv_endpoint localhost:29577" in cmd and "--nnodes 2 --nproc_per_node 4" in cmd
    # 90 minutes left - 10 minutes margin
    assert cmd.endswith(
        f"-m moetrain.train trainer.resume=auto hydra.run.dir={tmp_path / 'run'} "
        "trainer.stop_after_minutes=80 +experiment=mixtral_small"
    )


@pytest.mark.multiprocess
def test_two_node_localhost_torchrun():
    res = _run(
        [str(SCRIPTS / "two_node_localhost.sh"), "trainer.max_steps=3"],
        timeout=180,
        SCRIPT=str(PROBE),
        TIMEOUT_S="150",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    reports = _probe_reports(out)
    assert reports == {0: (2, 3), 1: (2, 3)}, out
    assert "args=['trainer.max_steps=3']" in out


@pytest.mark.multiprocess
def test_two_node_localhost_propagates_failure():
    res = _run(
        [str(SCRIPTS / "two_node_localhost.sh"), "--fail-rank", "1"],
        timeout=180,
        SCRIPT=str(PROBE),
        TIMEOUT_S="150",
    )
    out = res.stdout + res.stderr
    assert res.returncode not in (0, 124), out
    assert "node1 failed" in out


@pytest.mark.multiprocess
def test_two_node_localhost_deepspeed_no_ssh():
    res = _run(
        [str(SCRIPTS / "two_node_localhost.sh"), "trainer.max_steps=3", "--print-env", "MOETRAIN_PROBE"],
        timeout=240,
        SCRIPT=str(PROBE),
        LAUNCHER="deepspeed",
        TIMEOUT_S="200",
        MOETRAIN_PROBE="yes",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "--no_ssh --node_rank 0" in out and "--no_ssh --node_rank 1" in out
    assert _probe_reports(out) == {0: (2, 3), 1: (2, 3)}, out
    assert out.count("MOETRAIN_PROBE=yes") == 2, out


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["torchrun", "deepspeed"])
def test_slurm_job_under_fake_srun(tmp_path: Path, mode: str):
    bin_dir = _fake_slurm(tmp_path)
    port = 20000 + (os.getpid() % 20000)
    res = _run(
        ["bash", str(SCRIPTS / "slurm_train.sbatch")],
        timeout=240,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="fake[1-2]",
        SLURM_JOB_ID=str(os.getpid()),
        SLURM_GPUS_ON_NODE="1",
        MOETRAIN_ROOT=str(REPO),
        RUN_DIR=str(tmp_path / "run"),
        MASTER_PORT=str(port + (mode == "deepspeed")),
        LAUNCH_MODE=mode,
        SCRIPT=str(PROBE),
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert _probe_reports(out) == {0: (2, 3), 1: (2, 3)}, out
    assert "'trainer.resume=auto'" in out and "'trainer.stop_after_minutes=80'" in out


# --- GPU counting: nvidia-smi lists every GPU, CUDA_VISIBLE_DEVICES narrows it -------------------------


def _fake_nvidia_smi(tmp_path: Path, n: int = 8) -> str:
    """A PATH whose nvidia-smi lists `n` GPUs (and ignores CUDA_VISIBLE_DEVICES, like the real one)."""
    bin_dir = tmp_path / "gpu_bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        f'for i in $(seq 0 {n - 1}); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done\n'
    )
    smi.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def _local_nproc(path: str, cvd: str | None) -> int:
    env = {"PATH": path}
    if cvd is not None:
        env["CUDA_VISIBLE_DEVICES"] = cvd
    res = _run([str(SCRIPTS / "train_local.sh"), "--dry-run"], **env)
    assert res.returncode == 0, res.stderr
    return int(re.search(r"--nproc_per_node (\d+)", res.stdout).group(1))


@pytest.mark.parametrize(
    ("cvd", "nproc"),
    [
        (None, 8),  # every GPU nvidia-smi lists
        ("", 1),  # set but empty: no GPU, one CPU process
        ("4,5,6,7", 4),
        ("GPU-1,GPU-3", 2),  # UUIDs count too
        ("0,1,-1,2", 2),  # CUDA stops at the first invalid entry
        ("9", 1),  # no such GPU: none visible
    ],
)
def test_local_counts_visible_gpus(tmp_path: Path, cvd: str | None, nproc: int):
    assert _local_nproc(_fake_nvidia_smi(tmp_path), cvd) == nproc


def test_local_without_nvidia_smi_is_one_process(tmp_path: Path):
    # a PATH with bash and coreutils but no nvidia-smi, even with CUDA_VISIBLE_DEVICES set
    if shutil.which("nvidia-smi", path="/usr/bin:/bin") is not None:
        pytest.skip("nvidia-smi is in /usr/bin or /bin")
    assert _local_nproc("/usr/bin:/bin", "0,1") == 1


def test_two_node_splits_visible_gpus(tmp_path: Path):
    path = _fake_nvidia_smi(tmp_path)
    res = _run(
        [str(SCRIPTS / "two_node_localhost.sh"), "--dry-run", "a=1"],
        PATH=path,
        CUDA_VISIBLE_DEVICES="4,5,6,7",
        NPROC_PER_NODE="2",
        MASTER_PORT="29555",
    )
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("[node")]
    assert len(lines) == 2, res.stdout
    assert lines[0].startswith("[node0] + env CUDA_VISIBLE_DEVICES=4\\,5 ") and lines[0].endswith(" a=1")
    assert lines[1].startswith("[node1] + env CUDA_VISIBLE_DEVICES=6\\,7 ")
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 2" in lines[1]
    # too few visible GPUs for two disjoint halves: no split (both nodes use the first two)
    res = _run(
        [str(SCRIPTS / "two_node_localhost.sh"), "--dry-run"],
        PATH=path,
        CUDA_VISIBLE_DEVICES="4,5,6",
        NPROC_PER_NODE="2",
        MASTER_PORT="29555",
    )
    assert res.returncode == 0, res.stderr
    assert "CUDA_VISIBLE_DEVICES" not in res.stdout
    # empty CUDA_VISIBLE_DEVICES: CPU, nothing to split
    res = _run(
        [str(SCRIPTS / "two_node_localhost.sh"), "--dry-run"],
        PATH=path,
        CUDA_VISIBLE_DEVICES="",
        MASTER_PORT="1",
    )
    assert res.returncode == 0 and "CUDA_VISIBLE_DEVICES" not in res.stdout, res.stdout + res.stderr


def test_two_node_deepspeed_split_uses_include(tmp_path: Path):
    res = _run(
        [str(SCRIPTS / "two_node_localhost.sh"), "--dry-run"],
        PATH=_fake_nvidia_smi(tmp_path),
        CUDA_VISIBLE_DEVICES="4,5,6,7",
        NPROC_PER_NODE="2",
        LAUNCHER="deepspeed",
        MASTER_PORT="29555",
    )
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("[node")]
    # DeepSpeed's per-node launcher sets CUDA_VISIBLE_DEVICES from the hostfile slots: the split is an --include
    for line in lines:
        assert "DS_ARGS=--include\\ 127.0.0.1:4\\,5@localhost:6\\,7" in line, line
        assert "CUDA_VISIBLE_DEVICES" not in line and "GPUS_PER_NODE" not in line
