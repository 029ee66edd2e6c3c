"""A short generation at the end of a completed run, so a newcomer sees what the model learned."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig
from moetrain.distributed import DistEnv
from moetrain.trainer.guards import weights_finite


def end_of_run_sample(
    cfg: TrainConfig,
    env: DistEnv,
    ep: Any,
    model: Any,
    tokenizer: Any,
    run_dir: Path,
    log: Callable[[str], None],
) -> None:
    """Rank 0: ``trainer.sample_tokens`` tokens after ``trainer.sample_prompt``, printed and written
    to ``sample.txt``; skipped (one line) where the weights are spread over ranks or not finite."""
    if not env.is_main or not cfg.trainer.sample_tokens:
        return
    if ep.enabled or cfg.parallel.zero_stage == 3:  # the weights are spread over ranks
        how = "expert parallelism" if ep.enabled else "ZeRO-3"
        log(f"sample: skipped under {how}; run python -m moetrain.generate {run_dir}")
        return
    if not weights_finite(model):
        log("sample: skipped (the weights are not finite)")
        return
    from moetrain.generate import encode_prompt, generate_tokens

    ids = torch.tensor([encode_prompt(tokenizer, cfg.trainer.sample_prompt)], device=env.device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.trainer.seed)
    try:
        out = generate_tokens(
            model, ids, cfg.trainer.sample_tokens, temperature=0.8, top_p=0.95, generator=gen
        )
    except RuntimeError as e:  # e.g. non-finite probabilities: a numeric fault is not a crash
        log(f"sample: skipped ({str(e).splitlines()[0]})")
        return
    text = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
    print(f"sample: {text!r}", flush=True)
    (run_dir / "sample.txt").write_text(text + "\n")
