"""Two training runs in different layouts are the same training: losses, grad norms and weights
within bounds set between rounding and real bugs; the margin report."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moetrain.testing.runs import TrainRun, metric_by_step
from moetrain.testing.tolerances import metric_mismatches, rounding_rel, weight_mismatches

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
    the weights of both runs' ``weights_step`` checkpoints, expert by expert. Returns the
    failures; empty when the runs are the same training."""
    from moetrain.checkpoint import read_model_state

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
        folder = Path("checkpoints") / f"step_{weights_step:08d}"
        lr = peak_lr(de)
        bad += weight_mismatches(
            read_model_state(da / folder),
            read_model_state(de / folder),
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
