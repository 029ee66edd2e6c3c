"""Numerical comparisons with stated tolerances: the rounding model, tensor / metric / weight
mismatches, and the margins file (MOETRAIN_TEST_MARGINS)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from typing import Any

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


def assert_close_scaled(actual: Any, expected: Any, name: str, **bounds: Any) -> None:
    """:func:`scaled_mismatch` (same ``rel``, ``update_scale``, ``scale``) as an assertion
    (``AssertionError`` with the description)."""
    msg = scaled_mismatch(actual, expected, name, **bounds)
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
