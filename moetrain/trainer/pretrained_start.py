"""A loaded model proves itself: with ``model.init_from`` / ``model.upcycle_from`` the run evaluates
before its first step, prints that validation loss under the banner and writes it to metrics.jsonl
as ``step: 0``; a start that scores worse than uniform over the vocabulary stops the run.

Why "worse than uniform": any trained language model predicts far better than ``ln(vocab_size)``
nats per token; weights that load wrong (a head left at its random init, a transposed matrix, a
tokenizer that is not the model's) score at or above it. A randomly initialised model scores
``ln(V) + var(logits) / 2``, a hair above uniform, so the bound has a 1% allowance: a random tiny
model passes, the broken loads seen in practice (6% above uniform and more) do not.
"""

from __future__ import annotations

import math
from typing import Any

from moetrain.config import ConfigError

UNIFORM_ALLOWANCE = 1.01


class PretrainedLoadError(ConfigError):
    """The pretrained weights do not compute a language model; the message is one line."""


def check_pretrained_start(trainer: Any) -> dict[str, Any] | None:
    """Evaluate ``trainer``'s freshly loaded model (collective: every rank calls it), log the result
    as step 0 and raise ``PretrainedLoadError`` when it is worse than uniform. A no-op (None) for a
    model trained from scratch or without validation batches."""
    m = trainer.cfg.model
    source = m.upcycle_from or m.init_from
    if not source:
        return None
    result = trainer.evaluate()
    if not result:
        return None
    uniform = math.log(m.vocab_size)
    val = result["val_loss"]
    what = "upcycled" if m.upcycle_from else "loaded"
    trainer._log(
        f"  step 0 ({what} weights, before training): val_loss {val:.4f} (ppl {result['val_ppl']:.1f}; "
        f"uniform over {m.vocab_size} tokens: {uniform:.4f})"
    )
    record = {"step": 0, "tokens": 0, **result}
    trainer.metrics.write(record)
    trainer.wandb.log(record, step=0)
    if not val <= UNIFORM_ALLOWANCE * uniform:
        raise PretrainedLoadError(
            f"the weights did not load as the source model: {source} scores validation loss {val:.3f} before "
            f"training, worse than uniform over its {m.vocab_size} tokens (ln {m.vocab_size} = {uniform:.3f}); "
            "check that data.tokenizer is the model's own and that its config.json describes these weights"
        )
    return record
