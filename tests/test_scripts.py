"""Launch scripts under scripts/: syntax, dry-run command lines, and real two-"node" launches on
localhost with a stand-in training module (tests/_dist_probe.py) that only joins a gloo process group.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
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
    for k in (
        *("DRY_RUN", "HOSTFILE", "NO_SSH", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SCRIPT", "MODULE"),
        *("DS_LAUNCHER", "DS_LAUNCHER_ARGS", "DS_ARGS", "NUM_NODES", "GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES"),
        *("REQUEUE", "REQUEUE_MAX", "RUN_DIR", "LAUNCH_MODE", "STOP_AFTER_MINUTES", "DS_ENV_OUT"),
    ):
        env.pop(k, None)
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
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
    # -x from the repository root: follow `source scripts/common.sh` (the `# shellcheck source=` lines)
    res = subprocess.run(
        ["shellcheck", "-x", *(str(p.relative_to(REPO)) for p in SHELL_SCRIPTS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
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
    """scontrol/squeue/srun stand-ins: two 'nodes' (localhost, 127.0.0.1) on this machine.

    `scontrol requeue ID` only appends its arguments to <bin>/scontrol.log. srun starts one task per node
    (SLURM_NODEID, SLURM_PROCID) and forwards SIGUSR1/SIGTERM to every process of every task, descendants
    included, as slurmstepd does with proctrack/cgroup; it fails if any task fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = requeue ]; then echo "$@" >>"$(dirname "$0")/scontrol.log"; exit 0; fi\n'
        "echo localhost\necho 127.0.0.1\n"
    )
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 01:30:00\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        'while [[ "$1" == -* ]]; do shift; done\n'
        "pids=()\n"
        "trapped=0\n"
        'tree() { local c; echo "$1"; for c in $(pgrep -P "$1"); do tree "$c"; done; }\n'
        'fwd() { trapped=1; for p in "${pids[@]}"; do kill -s "$1" $(tree "$p") 2>/dev/null; done; }\n'
        "trap 'fwd USR1' USR1\n"
        "trap 'fwd TERM' TERM\n"
        'for i in 0 1; do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done\n'
        "rc=0\n"
        'for p in "${pids[@]}"; do\n'
        "  last=0\n"
        "  while :; do\n"
        '    trapped=0; st=0; wait "$p" || st=$?\n'
        "    [[ $trapped == 1 && $st == 127 ]] && break\n"
        "    last=$st; [[ $trapped == 1 ]] || break\n"
        "  done\n"
        "  [[ $last -ne 0 ]] && rc=$last\n"
        "done\n"
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
        REQUEUE="1",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert _probe_reports(out) == {0: (2, 3), 1: (2, 3)}, out
    assert "'trainer.resume=auto'" in out and "'trainer.stop_after_minutes=80'" in out
    # finished well before stop_after_minutes, no signal: nothing to requeue
    assert not (bin_dir / "scontrol.log").exists(), out


SIGNAL_PROBE = """
import os, pathlib, signal, sys, time

got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
rank = os.environ.get("RANK", "?")
pathlib.Path(os.environ["READY_DIR"], f"ready.{rank}").touch()
deadline = time.time() + 90
while not got and time.time() < deadline:
    time.sleep(0.05)
print(f"SIGNAL_PROBE rank={rank} usr1={bool(got)}", flush=True)
sys.exit(0 if got else 5)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["torchrun", "deepspeed"])
def test_slurm_usr1_reaches_training_and_requeues(tmp_path: Path, mode: str):
    """--signal=B:USR1: the batch shell forwards SIGUSR1 through srun; the launchers (torchrun, DeepSpeed)
    ignore it and survive, the training processes get it and exit 0, and REQUEUE=1 requeues the job."""
    bin_dir = _fake_slurm(tmp_path)
    probe = tmp_path / "signal_probe.py"
    probe.write_text(SIGNAL_PROBE)
    ready = tmp_path / "ready"
    ready.mkdir()
    port = 20000 + (os.getpid() % 20000) + 2 + (mode == "deepspeed")
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="fake[1-2]",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="sig",
        SLURM_GPUS_ON_NODE="1",
        SLURM_RESTART_COUNT="3",
        MOETRAIN_ROOT=str(REPO),
        RUN_DIR=str(tmp_path / "run"),
        MASTER_PORT=str(port),
        LAUNCH_MODE=mode,
        SCRIPT=str(probe),
        READY_DIR=str(ready),
        REQUEUE="1",
    )
    proc = subprocess.Popen(
        ["bash", str(SCRIPTS / "slurm_train.sbatch")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(ready.iterdir())) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(ready.iterdir())) == 2, (
            proc.communicate(timeout=30)[0] if proc.poll() is not None else ""
        )
        os.kill(proc.pid, signal.SIGUSR1)  # what Slurm does 120 s before the time limit (B: = batch shell)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out
    assert "SIGNAL_PROBE rank=0 usr1=True" in out and "SIGNAL_PROBE rank=1 usr1=True" in out, out
    assert (bin_dir / "scontrol.log").read_text() == "requeue 4242\n", out
    assert "requeueing job 4242" in out


def test_sbatch_header_requests_signal_and_requeue():
    lines = [
        line
        for line in (SCRIPTS / "slurm_train.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH")
    ]
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", "\n".join(lines), re.M), lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines


def test_slurm_dry_run_without_slurm_tools(tmp_path: Path):
    if any(shutil.which(t, path="/usr/bin:/bin") for t in ("scontrol", "squeue", "srun")):
        pytest.skip("Slurm tools in /usr/bin or /bin")
    sbatch = ["bash", str(SCRIPTS / "slurm_train.sbatch"), "a=1"]
    res = _run(
        sbatch,
        DRY_RUN="1",
        PATH="/usr/bin:/bin",
        SLURM_JOB_NODELIST="gpu[08-10,12],login1",
        SLURM_JOB_ID="5",
        SLURM_GPUS_ON_NODE="2",
        MOETRAIN_ROOT=str(REPO),
        RUN_DIR=str(tmp_path / "run"),
        REQUEUE="1",
    )
    assert res.returncode == 0, res.stderr
    hosts = ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]
    assert (tmp_path / "run" / "hostfile.5").read_text() == "".join(f"{h} slots=2\n" for h in hosts)
    cmd = next(line for line in res.stdout.splitlines() if line.startswith("+ "))
    assert cmd.startswith("+ srun --nodes=5 --ntasks-per-node=1 ")
    assert "--rdzv_endpoint gpu08:29505" in cmd and "--nnodes 5 --nproc_per_node 2" in cmd
    # no squeue: no time limit known, so no stop_after_minutes
    assert cmd.endswith(f"-m moetrain.train trainer.resume=auto hydra.run.dir={tmp_path / 'run'} a=1")
    assert "scontrol requeue 5" in res.stdout
    # nothing set at all: two placeholder nodes, and the default run dir named after the job id
    res = _run(
        sbatch, DRY_RUN="1", PATH="/usr/bin:/bin", MOETRAIN_ROOT=str(REPO), RUN_DIR=str(tmp_path / "r2")
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "r2" / "hostfile.0").read_text() == "node0 slots=8\nnode1 slots=8\n"
    # outside a dry run, a missing allocation is still an error
    res = _run(sbatch, PATH="/usr/bin:/bin", MOETRAIN_ROOT=str(REPO), RUN_DIR=str(tmp_path / "r3"))
    assert res.returncode != 0 and "SLURM_JOB_NODELIST" in res.stderr


def test_slurm_default_run_dir_is_per_job(tmp_path: Path):
    bin_dir = _fake_slurm(tmp_path)
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "train_multinode.sh").touch()  # what the sbatch script checks MOETRAIN_ROOT by
    res = _run(
        ["bash", str(SCRIPTS / "slurm_train.sbatch")],
        DRY_RUN="1",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="n[1-2]",
        SLURM_JOB_ID="31",
        SLURM_JOB_NAME="exp",
        MOETRAIN_ROOT=str(root),
    )
    assert res.returncode == 0, res.stderr
    assert (root / "outputs" / "slurm" / "exp-31" / "hostfile.31").is_file()
    assert "hydra.run.dir=outputs/slurm/exp-31 " in res.stdout


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


# --- DeepSpeed's MPI / Slurm backends (train_multinode.sh DS_LAUNCHER=...) -------------------------------


def _multinode_dry(backend: str, **env: str) -> subprocess.CompletedProcess[str]:
    res = _run(
        [str(SCRIPTS / "train_multinode.sh"), "--dry-run", "a=1"],
        HOSTFILE=str(SCRIPTS / "hostfile.example"),
        DS_LAUNCHER=backend,
        **env,
    )
    assert res.returncode == 0, res.stderr
    return res


def _dry_cmd(res: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in res.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, res.stdout
    return lines[0]


@pytest.mark.parametrize("backend", ["openmpi", "mvapich", "slurm"])
def test_multinode_direct_backends_export_master(backend: str):
    """These backends start python without DeepSpeed's per-node launcher: MASTER_ADDR/MASTER_PORT must
    travel in the environment file (-x / -env / --export), and the command must name something that runs."""
    res = _multinode_dry(backend, MASTER_PORT="29611")
    env_lines = res.stdout.splitlines()
    assert "MASTER_ADDR=node-0" in env_lines and "MASTER_PORT=29611" in env_lines, res.stdout
    cmd = _dry_cmd(res)
    assert f"--launcher {backend}" in cmd and "--master_addr node-0 --master_port 29611" in cmd
    if backend == "slurm":
        # SlurmRunner drops --module: a file that runs the module instead; srun needs no ssh check
        assert cmd.endswith(f"--no_ssh_check {SCRIPTS / 'run_module.py'} moetrain.train a=1"), cmd
        assert "--module" not in cmd
    else:
        assert cmd.endswith("--module moetrain.train a=1"), cmd
        assert "--no_ssh_check" not in cmd


def test_multinode_pdsh_and_mpich_leave_master_to_deepspeed():
    for backend in ("pdsh", "mpich"):
        res = _multinode_dry(backend)
        assert "MASTER_ADDR=" not in res.stdout, res.stdout
    assert "--launcher" not in _dry_cmd(
        _run([str(SCRIPTS / "train_multinode.sh"), "--dry-run"], HOSTFILE=str(SCRIPTS / "hostfile.example"))
    )


def test_multinode_mpi_backends_trim_the_hostfile(tmp_path: Path):
    # openmpi/mvapich/mpich/impi raise on --num_nodes/--num_gpus: a trimmed hostfile stands in for them
    env_out = tmp_path / "launch" / "deepspeed_env"
    res = _multinode_dry("openmpi", NUM_NODES="1", GPUS_PER_NODE="4", DS_ENV_OUT=str(env_out))
    cmd = _dry_cmd(res)
    assert f"--hostfile {tmp_path / 'launch' / 'hostfile'} " in cmd
    assert "--num_nodes" not in cmd and "--num_gpus" not in cmd
    assert (
        f"# hostfile ({tmp_path / 'launch' / 'hostfile'}, not written: dry run)\nnode-0 slots=4\n"
        in res.stdout
    )
    assert not (tmp_path / "launch").exists()  # dry run writes nothing
    # slurm takes them as flags (srun --nodes / --gpus-per-node)
    cmd = _dry_cmd(_multinode_dry("slurm", NUM_NODES="1", GPUS_PER_NODE="4"))
    assert "--num_nodes 1 --num_gpus 4" in cmd and str(SCRIPTS / "hostfile.example") in cmd
    res = _run(
        [str(SCRIPTS / "train_multinode.sh"), "--dry-run"],
        HOSTFILE=str(SCRIPTS / "hostfile.example"),
        DS_LAUNCHER="openmpi",
        GPUS_PER_NODE="16",
    )
    assert res.returncode != 0 and "GPUS_PER_NODE=16 but node-0 has slots=8" in res.stderr


def test_multinode_direct_backend_env_values(tmp_path: Path):
    # values DeepSpeed would wrap in literal quotes in an mpirun/srun argument are left out, with a warning
    res = _multinode_dry("openmpi", WANDB_NAME="my run", WANDB_PROJECT="moe")
    assert "WANDB_PROJECT=moe" in res.stdout and "WANDB_NAME" not in res.stdout
    assert "not propagating WANDB_NAME" in res.stderr
    # srun's --export list is comma-separated
    res = _multinode_dry("slurm", WANDB_TAGS="a,b", NCCL_IB_HCA="mlx5_0,mlx5_1")
    assert "WANDB_TAGS" not in res.stdout and "NCCL_IB_HCA" not in res.stdout
    assert "NCCL_IB_HCA contains a comma" in res.stderr
    # pdsh goes through a remote shell: spaces are fine there
    assert "WANDB_NAME=my run" in _multinode_dry("pdsh", WANDB_NAME="my run").stdout


def test_multinode_rejects_unknown_backend():
    res = _run(
        [str(SCRIPTS / "train_multinode.sh"), "--dry-run"],
        HOSTFILE=str(SCRIPTS / "hostfile.example"),
        DS_LAUNCHER="mpiexec",
    )
    assert res.returncode == 2 and "DS_LAUNCHER must be" in res.stderr


MPI_PROBE = """
import os, sys
from datetime import timedelta

import torch
import torch.distributed as dist

from moetrain.distributed.env import discover_launch_env

launch = discover_launch_env()
os.environ.update(launch)
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(
    f"PROBE rank={dist.get_rank()} world_size={dist.get_world_size()} local_rank={launch['LOCAL_RANK']} "
    f"sum={int(t.item())} args={sys.argv[1:]} name={__name__}",
    flush=True,
)
dist.destroy_process_group()
"""


def _fake_ds_backends(tmp_path: Path) -> Path:
    """Stand-ins for what DeepSpeed's openmpi, mvapich and slurm runners call. mpirun and srun write their
    arguments to <bin>/<name>.argv (one per line), then start the processes on this machine with the
    variables the real ones set (OMPI_COMM_WORLD_* / MV2_COMM_WORLD_* per FAKE_MPI, SLURM_*). mpirun, like
    on a remote host, drops MASTER_ADDR/MASTER_PORT from the environment and adds only -x / -env values."""
    bin_dir = tmp_path / "ds_bin"
    bin_dir.mkdir()
    (bin_dir / "ompi_info").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sinfo").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "mpiname").write_text("#!/bin/sh\necho 'MVAPICH2-GDR 2.3.7'\n")
    (bin_dir / "mpirun").write_text(
        "#!/usr/bin/env bash\n"
        'printf \'%s\\n\' "$@" >"$(dirname "$0")/mpirun.argv"\n'
        "n=1; envs=()\n"
        "while [[ $# -gt 0 ]]; do\n"
        '  case "$1" in\n'
        "    -n | -np) n=$2; shift 2 ;;\n"
        "    -hostfile | --hostfile | -ppn) shift 2 ;;\n"
        "    --mca | -mca) shift 3 ;;\n"
        '    -x | -env) envs+=("$2"); shift 2 ;;\n'
        "    -*) shift ;;\n"
        "    *) break ;;\n"
        "  esac\n"
        "done\n"
        "pids=()\n"
        "for ((i = 0; i < n; i++)); do\n"
        '  if [[ "$FAKE_MPI" == mvapich ]]; then p=MV2_COMM_WORLD; else p=OMPI_COMM_WORLD; fi\n'
        '  env -u MASTER_ADDR -u MASTER_PORT "${envs[@]}" ${p}_RANK=$i ${p}_SIZE=$n ${p}_LOCAL_RANK=0 \\\n'
        '    ${p}_LOCAL_SIZE=1 "$@" & pids+=($!)\n'
        "done\n"
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n'
    )
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        'printf \'%s\\n\' "$@" >"$(dirname "$0")/srun.argv"\n'
        "n=1; envs=()\n"
        "while [[ $# -gt 0 ]]; do\n"
        '  case "$1" in\n'
        "    -n | --ntasks) n=$2; shift 2 ;;\n"
        "    --nodes | --gpus-per-node | --comment | --nodelist) shift 2 ;;\n"
        '    --export=*) IFS=, read -r -a kv <<<"${1#--export=}"\n'
        '      for e in "${kv[@]}"; do [[ "$e" == *=* ]] && envs+=("$e"); done; shift ;;\n'
        "    -*) shift ;;\n"
        "    *) break ;;\n"
        "  esac\n"
        "done\n"
        "pids=()\n"
        "for ((i = 0; i < n; i++)); do\n"
        '  env "${envs[@]}" SLURM_PROCID=$i SLURM_NODEID=$i SLURM_LOCALID=0 SLURM_STEP_NUM_TASKS=$n \\\n'
        '    SLURM_STEP_TASKS_PER_NODE="1(x$n)" "$@" & pids+=($!)\n'
        "done\n"
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["openmpi", "slurm"])  # mvapich: as openmpi, with -env for -x
def test_multinode_direct_backend_runs(tmp_path: Path, backend: str):
    """The real DeepSpeed runner with a two-host hostfile and a stand-in mpirun/srun: both processes find
    their rank (discover_launch_env) and MASTER_ADDR/MASTER_PORT, join one gloo group, and run the module."""
    bin_dir = _fake_ds_backends(tmp_path)
    (tmp_path / "mt_probe.py").write_text(MPI_PROBE)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    port = str(20000 + (os.getpid() % 20000) + 5 + (backend == "slurm"))
    res = _run(
        [str(SCRIPTS / "train_multinode.sh"), "a=1"],
        timeout=180,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHONPATH=str(tmp_path),
        HOSTFILE=str(hostfile),
        DS_LAUNCHER=backend,
        DS_ARGS="" if backend == "slurm" else "--no_ssh_check",
        DS_ENV_OUT=str(tmp_path / "launch" / "deepspeed_env"),
        MASTER_PORT=port,
        MODULE="mt_probe",
        FAKE_MPI=backend,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert _probe_reports(out) == {0: (2, 3), 1: (2, 3)}, out
    assert out.count("args=['a=1'] name=__main__") == 2, out
    argv = (bin_dir / ("srun.argv" if backend == "slurm" else "mpirun.argv")).read_text().splitlines()
    if backend == "slurm":
        export = next(a for a in argv if a.startswith("--export="))
        assert export.startswith("--export=ALL,") and f"MASTER_PORT={port}" in export.split(","), export
        assert argv[-3:] == [str(SCRIPTS / "run_module.py"), "mt_probe", "a=1"], argv
    else:
        flag = "-x" if backend == "openmpi" else "-env"
        exported = {argv[i + 1] for i, a in enumerate(argv) if a == flag}
        assert {"MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}"} <= exported, argv
        assert argv[-3:] == ["-m", "mt_probe", "a=1"], argv
