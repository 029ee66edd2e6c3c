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
- numerical comparisons with stated tolerances (the model is described above ``rounding_rel``):
  ``rounding_rel(n_ops)`` (n_ops x the dtype's eps), ``assert_close_scaled`` / ``scaled_mismatch`` (a
  tensor against another, relative to its scale, plus an optimizer-update allowance),
  ``assert_separated`` (perturbation tests: unchanged vs changed positions, orders of magnitude
  apart), ``metric_mismatches`` (per-step metrics of two runs) and ``weight_mismatches`` (trained
  weights, expert by expert). The ``*_mismatches`` forms return the failures, so negative controls can
  assert that a deliberately broken result is reported.
- ``equivalence_mismatches(run_a, run_b, steps, ...)`` / ``assert_equivalent``: two training runs in
  different layouts are the same training (losses, grad norms, weights), within bounds set between
  rounding and real bugs (``LOSS_REL``, ``GRAD_NORM_REL``, ``WEIGHT_*``).
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


# Tiny transformers models of every family moetrain maps (moetrain/hf.py): vocab 512 (the fixture
# BPE's size), hidden 32, 2 layers, 4 experts top-2. Each family's own options are switched on.
_HF_TINY = {
    "vocab_size": 512,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
HF_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"intermediate_size": 48, "num_local_experts": 4,
                                                        "num_experts_per_tok": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"intermediate_size": 48}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"intermediate_size": 48, "num_experts": 4,
                                                  "num_experts_per_tok": 2, "norm_topk_prob": False}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_hidden_layers": 3, "intermediate_size": 64, "moe_intermediate_size": 48,
        "shared_expert_intermediate_size": 40, "num_experts": 4, "num_experts_per_tok": 2,
        "mlp_only_layers": [1], "qkv_bias": True, "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_hidden_layers": 3, "head_dim": 16, "intermediate_size": 64, "moe_intermediate_size": 48,
        "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 2, "norm_topk_prob": True}),
    # dense sources of sparse upcycling
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"intermediate_size": 48}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "intermediate_size": 48}),
}  # fmt: skip


def tiny_hf_model(family: str, folder: str | os.PathLike | None = None, seed: int = 0, **overrides: Any):
    """A tiny random transformers model of ``family`` (a key of ``HF_FAMILIES``), eval mode, fp32, with
    non-trivial norm weights and biases (so a swapped norm or a dropped bias shows). With ``folder``
    it is also saved there (``save_pretrained``, safetensors; ``max_shard_size`` in ``overrides`` is
    passed on, to write sharded checkpoints)."""
    import torch
    import transformers

    cfg_cls, model_cls, extra = HF_FAMILIES[family]
    shard = overrides.pop("max_shard_size", None)
    hf_cfg = getattr(transformers, cfg_cls)(**{**_HF_TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
    if folder is not None:
        kw = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(str(folder), safe_serialization=True, **kw)
    return model


# ---- numerical comparisons --------------------------------------------------------------------------
# The tolerance model every numerical test states its bounds in (see tests/README.md, "Numerics"):
#
# * Rounding. Two evaluations of the same math in floating point that differ only in the order of
#   operations (another GEMM blocking because a batch has other row counts, another reduction tree,
#   another CPU's MKL/oneDNN kernel) differ per element by about ``c * eps * scale``: ``eps`` is
#   ``torch.finfo(dtype).eps`` (1.19e-7 for fp32, 7.8e-3 for bf16), ``scale`` the magnitude of the
#   values involved (here: the tensor's largest |value|) and ``c`` grows with the number of rounded
#   operations accumulated along the way (their count in the worst case, ~ its square root typically).
#   So a tolerance is written ``rounding_rel(c) * scale``, never as a bare absolute number.
# * Training. After optimizer steps rounding differences are no longer ``eps``-sized: Adam divides each
#   gradient by its own running RMS, so an element whose gradient is mostly rounding noise can move by
#   a different fraction of one update (~lr). Trained weights are therefore compared against a
#   fraction of the per-step update size, both elementwise (max) and in aggregate (RMS over a tensor):
#   rounding moves a few elements, a real bug (an expert averaged with another expert, a gradient
#   scaled by 1/ep) moves whole tensors by whole updates.
# * Exact equality is asserted only where the computation is provably the same sequence of operations
#   on the same shapes (a rerun, a resume in the same layout, a copy).
#
# Setting MOETRAIN_TEST_MARGINS=FILE appends one JSON line per comparison (test, name, observed
# difference, bound) to FILE: how close a machine comes to each bound, for comparing CPUs.

MARGINS_ENV = "MOETRAIN_TEST_MARGINS"


def rounding_rel(n_ops: float = 1, dtype: Any = None) -> float:
    """``n_ops`` units of ``torch.finfo(dtype).eps`` (fp32 when ``dtype`` is None): the relative size of
    the rounding differences accumulated over about ``n_ops`` rounded operations."""
    import torch

    return float(n_ops) * torch.finfo(torch.float32 if dtype is None else dtype).eps


def _record_margin(name: str, diff: float, bound: float, kind: str) -> None:
    """Append ``diff`` vs ``bound`` to the MOETRAIN_TEST_MARGINS file, if set. ``ratio`` < 1 passes:
    diff / bound for upper bounds, bound / diff for lower bounds (``kind`` "min")."""
    path = os.environ.get(MARGINS_ENV)
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    num, den = (bound, diff) if kind == "min" else (diff, bound)
    line = {"test": test, "name": name, "kind": kind, "diff": diff, "bound": bound}
    line["ratio"] = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def margins_paused():
    """Comparisons made inside record no margins: for negative controls, whose failures are expected."""
    saved = os.environ.pop(MARGINS_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[MARGINS_ENV] = saved


def _describe_index(flat_index: int, shape: tuple[int, ...]) -> str:
    idx = []
    for size in reversed(shape):
        idx.append(flat_index % size)
        flat_index //= size
    return str(tuple(reversed(idx))) if shape else "()"


def scaled_mismatch(
    actual: Any,
    expected: Any,
    name: str,
    *,
    rel: float,
    update_scale: float = 0.0,
    scale: float | None = None,
) -> str | None:
    """Compare two tensors; ``None`` when ``max |actual - expected| <= rel * scale + update_scale``, else
    a one-line description of the worst element.

    ``scale`` defaults to ``max |expected|`` (the tensor's magnitude; pass it when several tensors share
    one, e.g. a layer's outputs). ``rel`` is the rounding allowance (see :func:`rounding_rel`);
    ``update_scale`` an absolute allowance for trained weights (a fraction of the optimizer's per-step
    update size) and 0 otherwise. Shapes must match and every value must be finite. Both are compared
    in float64, so the comparison itself adds no rounding."""
    import torch

    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        return f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    for label, t in (("actual", a), ("expected", e)):
        if not bool(torch.isfinite(t).all()):
            return f"{name}: {label} has non-finite values"
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    bound = rel * scale + update_scale
    diff_t = (a - e).abs()
    diff = float(diff_t.max()) if diff_t.numel() else 0.0
    _record_margin(name, diff, bound, "max")
    if diff <= bound:
        return None
    i = int(diff_t.argmax())
    return (
        f"{name}: max |diff| {diff:.3e} > bound {bound:.3e} (= {rel:.2e} x scale {scale:.3e}"
        f" + {update_scale:.2e}) at {_describe_index(i, tuple(a.shape))}:"
        f" {a.reshape(-1)[i].item():.8g} vs {e.reshape(-1)[i].item():.8g}"
    )


def assert_close_scaled(
    actual: Any,
    expected: Any,
    name: str,
    *,
    rel: float,
    update_scale: float = 0.0,
    scale: float | None = None,
) -> None:
    """:func:`scaled_mismatch` as an assertion (``AssertionError`` with the description)."""
    msg = scaled_mismatch(actual, expected, name, rel=rel, update_scale=update_scale, scale=scale)
    if msg is not None:
        raise AssertionError(msg)


def separation_mismatches(
    diff: Any,
    changed: Any,
    name: str,
    *,
    scale: float,
    same_rel: float,
    changed_rel: float,
) -> list[str]:
    """For a perturbation test (causality, receptive field): positions that must not see the change
    differ by at most ``same_rel * scale`` (rounding: another GEMM blocking elsewhere in the batch),
    positions that must see it differ by at least ``changed_rel * scale``.

    ``diff``: per-position differences (e.g. max |logits_a - logits_b| over the vocab, [B, T]);
    ``changed``: a bool tensor of the same shape, True where the change must be visible. The two
    thresholds must be at least 100x apart: the test separates the classes by orders of magnitude, not
    by the last bit. Returns the failures (empty when the check holds)."""
    import torch

    if changed_rel < 100 * same_rel:
        raise ValueError(f"{name}: thresholds {same_rel:g} and {changed_rel:g} are not 100x apart")
    diff = torch.as_tensor(diff).detach().double()
    changed = torch.as_tensor(changed, dtype=torch.bool)
    if changed.shape != diff.shape:
        raise ValueError(f"{name}: changed {tuple(changed.shape)} vs diff {tuple(diff.shape)}")

    def where(mask: Any) -> list[Any]:
        rows = torch.nonzero(mask).tolist()
        return [r[0] if len(r) == 1 else tuple(r) for r in rows]

    out = []
    same_bound, changed_bound = same_rel * scale, changed_rel * scale
    if (~changed).any():
        worst = float(diff[~changed].max())
        _record_margin(f"{name} (unchanged)", worst, same_bound, "max")
        if worst > same_bound:
            pos = where(~changed & (diff > same_bound))
            out.append(
                f"{name}: positions {pos} must not see the change but differ by up to {worst:.3e}"
                f" > {same_bound:.3e} (= {same_rel:.1e} x scale {scale:.3e})"
            )
    if changed.any():
        least = float(diff[changed].min())
        _record_margin(f"{name} (changed)", least, changed_bound, "min")
        if least < changed_bound:
            pos = where(changed & (diff < changed_bound))
            out.append(
                f"{name}: positions {pos} must see the change but differ by only {least:.3e}"
                f" < {changed_bound:.3e} (= {changed_rel:.1e} x scale {scale:.3e})"
            )
    return out


def assert_separated(
    diff: Any, changed: Any, name: str, *, scale: float, same_rel: float, changed_rel: float
) -> None:
    """:func:`separation_mismatches` as an assertion."""
    bad = separation_mismatches(diff, changed, name, scale=scale, same_rel=same_rel, changed_rel=changed_rel)
    if bad:
        raise AssertionError("\n".join(bad))


def metric_mismatches(
    actual: dict[int, float],
    expected: dict[int, float],
    key: str,
    steps: Iterable[int],
    *,
    rel: float,
) -> list[str]:
    """Per-step metrics (``{step: value}``) of two runs: ``|actual - expected| <= rel * |expected|`` at
    every step in ``steps`` (each must be logged by both). Returns the failures."""
    steps = list(steps)
    if not steps:
        raise ValueError("no steps to compare")
    out = []
    worst = 0.0
    for s in steps:
        if s not in actual or s not in expected:
            out.append(f"{key}: step {s} logged in only one run")
            continue
        a, e = float(actual[s]), float(expected[s])
        bound = rel * abs(e)
        d = abs(a - e)
        worst = max(worst, d / bound if bound > 0 else (0.0 if d == 0 else float("inf")))
        if not d <= bound:
            out.append(f"{key} at step {s}: {a!r} vs {e!r}, |diff| {d:.3e} > {rel:.1e} x |{e:.6g}|")
    _record_margin(key, worst, 1.0, "max-ratio")
    return out


def weight_mismatches(
    actual: dict[str, Any],
    expected: dict[str, Any],
    *,
    rel: float,
    max_update: float,
    rms_update: float,
    expert_suffixes: tuple[str, ...] = (".experts.w1", ".experts.v1", ".experts.w2"),
) -> list[str]:
    """Trained weights of two runs (state dicts), tensor by tensor and, for the fused ``[E, F, H]`` expert
    tensors, expert by expert (so one wrong expert cannot hide among correct ones):

        max |a - b|  <= rel * max |b|  + max_update
        rms(a - b)   <= rel * rms(b)   + rms_update

    ``rel``: the weights' own rounding (a few eps); ``max_update`` / ``rms_update``: absolute
    allowances, fractions of the optimizer's per-step update size (see the module's tolerance model).
    Returns the failures (empty when every tensor holds)."""
    out = []
    if actual.keys() != expected.keys():
        return [f"different tensors: only in actual {sorted(actual.keys() - expected.keys())},"
                f" only in expected {sorted(expected.keys() - actual.keys())}"]  # fmt: skip
    for k in expected:
        a, e = actual[k], expected[k]
        if a.shape != e.shape:
            out.append(f"{k}: shape {tuple(a.shape)} != {tuple(e.shape)}")
            continue
        parts = (
            [(f"{k}[expert {i}]", a[i], e[i]) for i in range(e.shape[0])]
            if k.endswith(expert_suffixes)
            else [(k, a, e)]
        )
        for name, pa, pe in parts:
            msg = scaled_mismatch(pa, pe, name, rel=rel, update_scale=max_update)
            if msg is not None:
                out.append(msg)
            d = (pa.double() - pe.double()).pow(2).mean().sqrt().item()
            bound = rel * pe.double().pow(2).mean().sqrt().item() + rms_update
            _record_margin(f"{name} (rms)", d, bound, "rms")
            if d > bound:
                out.append(f"{name}: rms diff {d:.3e} > bound {bound:.3e}")
    return out


# ---- the same training in another layout ------------------------------------------------------------
# What "the same training" means for two runs in different layouts (ep 2 vs 1 process, ZeRO-2 vs ZeRO-0,
# 2 data-parallel ranks vs 1, a checkpoint resumed in another layout), in fp32 (eps = 1.19e-7).
# Another layout sums the same numbers in another order (per-rank partial sums, other GEMM row counts,
# all-to-all order), so the runs agree to rounding, amplified by training. Each bound sits orders of
# magnitude between what rounding produced and what a real bug produces. Measured on mixtral_tiny
# (20 steps, lr 3e-3; AMD EPYC, MKL default / MKL_CBWR=AVX2 / COMPATIBLE; ep 2, ep 2 + ZeRO-2 and
# 2 ranks vs 1 process) against the negative controls in tests/distributed/test_expert_parallel.py
# (ep 2 trained with an expert averaged with another rank's expert, or with expert gradients scaled
# by 1/ep):
# - losses (loss, lm_loss, aux_loss, z_loss, val_loss), relative to the value: rounding <= 2.4e-7
#   (2 ulps); wrong expert group 8.6e-4 (loss) .. 2.8e-2 (z_loss). Bound 1e-5 (~80 ulps).
LOSS_REL = 1e-5
# - grad_norm, relative: rounding <= 1.9e-5 (growing over the steps as the weights drift apart);
#   1/ep scaling 4e-3 at step 1, up to 3.3e-2. Bound 3e-4.
GRAD_NORM_REL = 3e-4
# - weights after N steps, in units of the peak learning rate (AdamW moves an element by <= ~lr per
#   step whatever its gradient's size): rounding moves single elements whose gradient is mostly noise
#   (max 1.8e-2 lr here, 2.9e-2 lr seen on another AMD EPYC) and whole tensors by RMS <= 1e-4 lr; the
#   wrong expert group moves every expert by RMS >= 2.8 lr, 1/ep scaling some tensors by RMS 2.5e-2 lr.
#   Bounds: max 0.5 lr, RMS 1e-3 lr, plus 8 ulps of the tensor's own scale (its own rounding).
WEIGHT_MAX_LR, WEIGHT_RMS_LR, WEIGHT_REL_ULPS = 0.5, 1e-3, 8


def _run_dir(run: TrainRun | str | os.PathLike) -> Path:
    return run.run_dir if isinstance(run, TrainRun) else Path(run)


def peak_lr(run: TrainRun | str | os.PathLike) -> float:
    """``optim.lr`` of a run (its composed Hydra config)."""
    import yaml

    cfg = yaml.safe_load((_run_dir(run) / ".hydra" / "config.yaml").read_text())
    return float(cfg["optim"]["lr"])


def equivalence_mismatches(
    actual: TrainRun | str | os.PathLike,
    expected: TrainRun | str | os.PathLike,
    steps: Iterable[int],
    keys: Iterable[str] = ("loss", "lm_loss"),
    grad_norm: bool = False,
    val_steps: Iterable[int] = (),
    weights_step: int | None = None,
) -> list[str]:
    """Everything in which run ``actual`` is not the same training as run ``expected`` (the bounds above):
    the per-step metrics ``keys`` (and ``grad_norm``) over ``steps``, ``val_loss`` at ``val_steps``, and
    the ``model.safetensors`` of both runs' ``weights_step`` checkpoints, expert by expert. Returns the
    failures; empty when the runs are the same training."""
    from safetensors.torch import load_file

    da, de = _run_dir(actual), _run_dir(expected)
    steps = list(steps)
    bad: list[str] = []
    for key in keys:
        bad += metric_mismatches(metric_by_step(da, key), metric_by_step(de, key), key, steps, rel=LOSS_REL)
    val_steps = list(val_steps)
    if val_steps:
        va, ve = metric_by_step(da, "val_loss"), metric_by_step(de, "val_loss")
        bad += metric_mismatches(va, ve, "val_loss", val_steps, rel=LOSS_REL)
    if grad_norm:
        ga, ge = metric_by_step(da, "grad_norm"), metric_by_step(de, "grad_norm")
        bad += metric_mismatches(ga, ge, "grad_norm", steps, rel=GRAD_NORM_REL)
    if weights_step is not None:
        file = Path("checkpoints") / f"step_{weights_step:08d}" / "model.safetensors"
        lr = peak_lr(de)
        bad += weight_mismatches(
            load_file(str(da / file)),
            load_file(str(de / file)),
            rel=rounding_rel(WEIGHT_REL_ULPS),
            max_update=WEIGHT_MAX_LR * lr,
            rms_update=WEIGHT_RMS_LR * lr,
        )
    return bad


def assert_equivalent(
    actual: TrainRun | str | os.PathLike,
    expected: TrainRun | str | os.PathLike,
    steps: Iterable[int],
    **kwargs: Any,
) -> None:
    """:func:`equivalence_mismatches` as an assertion."""
    bad = equivalence_mismatches(actual, expected, steps, **kwargs)
    if bad:
        raise AssertionError("not the same training:\n" + "\n".join(bad))


def margin_report(path: str | os.PathLike, top: int = 20) -> str:
    """The ``top`` comparisons of a MOETRAIN_TEST_MARGINS file that came closest to their bounds
    (ratio = observed / allowed; 1 fails), one per test and name: where a new CPU would fail first."""
    worst: dict[tuple[str, str], dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            key = (r["test"], r["name"])
            if key not in worst or r["ratio"] > worst[key]["ratio"]:
                worst[key] = r
    rows = sorted(worst.values(), key=lambda r: -r["ratio"])[:top]
    return "\n".join(
        f"{r['ratio']:7.3f}  {r['test']}  {r['name']}  ({r['kind']}: {r['diff']:.3e} vs {r['bound']:.3e})"
        for r in rows
    )


if __name__ == "__main__":  # python -m moetrain.testing MARGINS_FILE [TOP]
    print(margin_report(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20))
