"""Helpers for moetrain's own tests (tests/README.md), by concern: process.py, runs.py, spawn.py,
fixtures.py, tolerances.py, equivalence.py. Everything is importable from ``moetrain.testing``: run training as a subprocess and read its outputs, and run a
function on several gloo processes in-process.

Not imported by the package itself; ``import moetrain.testing`` pulls in only the standard library
and torch.

- ``run_train(run_dir, *overrides, nproc=1)``: ``python -m moetrain.train`` (or ``torchrun --standalone
  --nproc_per_node=N``) with ``hydra.run.dir=run_dir``, offline (no network: ``HF_HUB_OFFLINE=1`` and an
  HTTP proxy that refuses connections, so any HTTP attempt fails loudly), returning the
  ``CompletedProcess``.
- ``run_tool_in_process(module, *args)``: export / generate / analyze through their ``main(argv)`` in
  this process (no interpreter start), returning a ``CompletedProcess``.
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

from moetrain.testing.equivalence import (
    GRAD_NORM_REL,
    LOSS_REL,
    WEIGHT_MAX_LR,
    WEIGHT_REL_ULPS,
    WEIGHT_RMS_LR,
    assert_equivalent,
    equivalence_mismatches,
    margin_report,
    peak_lr,
)
from moetrain.testing.fixtures import (
    HF_FAMILIES,
    TINY_MODEL,
    TINY_OVERRIDES,
    ep_train_config,
    reference_run,
    tiny,
    tiny_hf_model,
    tiny_model_config,
)
from moetrain.testing.process import (
    DEAD_PROXY,
    FAST_OVERRIDES,
    REPO_ROOT,
    check_ok,
    describe,
    free_port,
    merge_overrides,
    offline_env,
    run_command,
    run_tool_in_process,
    run_train,
    train_command,
)
from moetrain.testing.runs import (
    TrainRun,
    cached_run,
    max_abs_diff,
    metric_by_step,
    read_metrics,
    session_dir,
)
from moetrain.testing.spawn import run_distributed
from moetrain.testing.tolerances import (
    MARGINS_ENV,
    assert_close_scaled,
    assert_separated,
    margins_paused,
    metric_mismatches,
    rounding_rel,
    scaled_mismatch,
    separation_mismatches,
    weight_mismatches,
)
