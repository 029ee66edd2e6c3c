"""Where one training step's time goes: attention, router, dispatch/combine, experts (or the dense
FFN), embedding, LM head + loss (one fused function, ``model/lm_loss.py``), router losses, optimizer,
grad norm + clip, logging/metrics, other.

One ``Trainer._train_step`` runs under ``torch.profiler`` with a ``record_function`` scope around each
component's forward. Backward time is attributed through autograd's sequence numbers: a backward
node carries the sequence number of the forward op that created it, and that op sits inside a scope.
Profiler overhead inflates every component a little; compare shares, not absolute milliseconds.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager

from torch.profiler import ProfilerActivity, profile, record_function

COMPONENTS = (
    "attention",
    "router",
    "dispatch/combine",
    "experts/ffn",
    "embed",
    "lm_head+loss",
    "router_losses",
    "optimizer",
    "grad_norm+clip",
    "logging/metrics",
    "other",
)
_PREFIX = "## "


def _scoped(fn, label: str):
    def wrapped(*args, **kwargs):
        with record_function(_PREFIX + label):
            return fn(*args, **kwargs)

    return wrapped


@contextmanager
def _patched(obj, attr: str, label: str):
    had_own = attr in vars(obj)
    original = getattr(obj, attr)
    setattr(obj, attr, _scoped(original, label))
    try:
        yield
    finally:
        if had_own:
            setattr(obj, attr, original)
        else:
            delattr(obj, attr)


def _label_scopes(trainer) -> list[tuple[object, str, str]]:
    import moetrain.model.transformer as transformer_module

    model = trainer.model
    targets: list[tuple[object, str, str]] = [
        (model.embed, "forward", "embed"),
        (model.lm_head, "forward", "lm_head+loss"),  # LMHead: logits, or with labels the fused loss
        (transformer_module, "load_balancing_loss", "router_losses"),
        (transformer_module, "router_z_loss", "router_losses"),
        (trainer.engine, "step", "optimizer"),
        (trainer, "_grad_norm", "grad_norm+clip"),
        (trainer, "_clip", "grad_norm+clip"),
        (trainer.routing, "add", "logging/metrics"),
    ]
    for block in model.layers:
        targets.append((block.attention, "forward", "attention"))
        if block.is_moe:
            targets += [
                (block.ffn, "forward", "dispatch/combine"),
                (block.ffn.router, "forward", "router"),
                (block.ffn, "_stats", "router"),
                (block.ffn.experts, "forward", "experts/ffn"),
            ]
        else:
            targets.append((block.ffn, "forward", "experts/ffn"))
    return targets


def _attribute(events, total_ms: float) -> dict[str, float]:
    out = dict.fromkeys(COMPONENTS, 0.0)
    seq_label: dict[int, str] = {}

    def scope_of(ev):
        p = ev.cpu_parent
        while p is not None:
            if p.name.startswith(_PREFIX):
                return p.name[len(_PREFIX) :]
            p = p.cpu_parent
        return None

    for ev in events:
        if ev.name.startswith(_PREFIX):  # forward time of a scope, minus the scopes nested in it
            nested = sum(c.cpu_time_total for c in _nested_scopes(ev))
            out[ev.name[len(_PREFIX) :]] += (ev.cpu_time_total - nested) / 1e3
        elif ev.sequence_nr >= 0 and not ev.name.startswith("autograd::"):
            label = scope_of(ev)
            if label is not None:
                seq_label.setdefault(ev.sequence_nr, label)
    for ev in events:
        if ev.name.startswith("autograd::engine::evaluate_function: ") and ev.cpu_parent is None:
            seqs = [c.sequence_nr for c in ev.cpu_children if c.sequence_nr >= 0]
            label = next((seq_label[s] for s in seqs if s in seq_label), None)
            if label is not None:
                out[label] += ev.cpu_time_total / 1e3
    out["other"] = total_ms - sum(v for k, v in out.items() if k != "other")
    out["total"] = total_ms
    return out


def _nested_scopes(ev):
    for c in ev.cpu_children:
        if c.name.startswith(_PREFIX):
            yield c
        else:
            yield from _nested_scopes(c)


def profile_step_split(trainer) -> dict[str, float]:
    """Milliseconds per component of one training step (``trainer`` set up as bench_train_step does)."""
    with ExitStack() as stack:
        for obj, attr, label in _label_scopes(trainer):
            stack.enter_context(_patched(obj, attr, label))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            trainer._train_step()
            total_ms = (time.perf_counter() - t0) * 1e3
    trainer.step += 1
    return _attribute(prof.events(), total_ms)
