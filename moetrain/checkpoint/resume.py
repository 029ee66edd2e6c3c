"""Choosing the checkpoint to resume from, and restoring the whole training state from it.

``choose`` runs on rank 0 before any expensive work: ``trainer.resume=auto`` walks back from
``latest`` past damaged checkpoints (hashing them, warning for each); an explicit path is checked
for completeness (sizes; its hashes are verified while the ranks read it, each file by one rank);
either must hold no code-carrying pickle. ``restore`` (collective) puts weights, fp32 masters,
AdamW state, the LR schedule, the data position and the RNG streams back, at any layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moetrain.checkpoint.base_ref import KEY as BASE_KEY
from moetrain.checkpoint.base_ref import check_base
from moetrain.checkpoint.checkpointer import io_counters, memory_kib
from moetrain.checkpoint.integrity import verify
from moetrain.checkpoint.legacy_format import load_engine_state, load_training_state
from moetrain.checkpoint.loader import is_sharded, load_sharded
from moetrain.checkpoint.manager import CheckpointManager, read_trainer_state
from moetrain.checkpoint.model_file import CheckpointError, read_config, resolve_checkpoint
from moetrain.checkpoint.optimizer_state import FILE as OPTIMIZER_FILE
from moetrain.checkpoint.rank_state import read_rank_state, set_rng_state
from moetrain.checkpoint.safe_load import code_in_checkpoint
from moetrain.config import MoEConfig, shape_fields


def choose(resume: str | None, manager: CheckpointManager, run_dir: Path, *, trust: bool, log) -> tuple:
    """Rank 0: ``(folder or None, verify_while_reading, problem or None)``."""
    if resume is None:
        return None, False, None
    try:
        if resume == "auto":
            folder = manager.latest_intact(warn=log)  # hashes: walks back past a bit flip
            if folder is None:
                ckpts = run_dir / "checkpoints"
                damaged = ckpts.is_dir() and any(ckpts.glob("step_*"))
                log(
                    "trainer.resume=auto: "
                    + (
                        "no intact checkpoint (see warnings above)"
                        if damaged
                        else "no checkpoint in this run dir yet"
                    )
                    + ", starting from scratch"
                )
                return None, False, None
            check = False
        else:
            try:
                folder = resolve_checkpoint(resume)
            except CheckpointError as e:
                raise CheckpointError(f"trainer.resume={resume!r}: {e}") from None
            problem = verify(folder, hashes=not is_sharded(folder))  # shards: hashed while read
            if problem is not None:  # an explicit choice is never silently replaced by another one
                raise CheckpointError(f"trainer.resume={resume!r} is damaged: {problem}")
            check = is_sharded(folder)
        return str(folder), check, code_in_checkpoint(folder, trust=trust)
    except CheckpointError as e:
        return None, False, str(e)


def check_same_shape(folder: Path, model_cfg: Any) -> None:
    """A checkpoint of another model shape: one line naming the fields."""
    saved = (read_config(folder) or {}).get("model", {})
    ours = dataclasses.asdict(model_cfg)
    # The fields marked SHAPE in moetrain/config/model.py (model.* and model.moe.*).
    diff = [
        f"model.{k}: {saved[k]} -> {ours[k]}" for k in shape_fields() if k in saved and saved[k] != ours[k]
    ]
    saved_moe, ours_moe = saved.get("moe") or {}, ours["moe"]
    diff += [
        f"model.moe.{k}: {saved_moe[k]} -> {ours_moe[k]}"
        for k in shape_fields(MoEConfig)
        if k in saved_moe and saved_moe[k] != ours_moe[k]
    ]
    if diff:
        raise CheckpointError(
            f"checkpoint {folder} has another model shape ({', '.join(diff)}); fix: resume with the "
            "checkpoint's model settings, or start a new run (another hydra.run.dir)"
        )


def restore(
    folder: Path,
    *,
    cfg: Any,
    env: Any,
    ep: Any,
    model: Any,
    view: Any,
    engine: Any,
    scheduler: Any,
    loader: Any,
    verify_files: bool,
    log: Callable[[str], None],
    stats_dir: Path | None = None,
    lora_base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collective. Returns the trainer state (step, tokens_seen, ...). ``lora_base``: the base model
    reference of this run (LoRA), which must be the one the checkpoint's adapters were trained on."""
    io0 = io_counters()
    check_same_shape(folder, cfg.model)
    state = read_trainer_state(folder)
    if state.get(BASE_KEY) and state[BASE_KEY] != lora_base:
        check_base(state[BASE_KEY], folder)  # names what is wrong with the base
        raise CheckpointError(f"{folder} is a LoRA checkpoint of another base model ({state[BASE_KEY]})")
    trust = cfg.trainer.trust_checkpoint_code
    same_layout = state.get("ep_size") == cfg.parallel.ep_size and state.get("world_size") == env.world_size
    restored = True
    if is_sharded(folder):
        problem = load_sharded(
            folder,
            model,
            view,
            rank=env.rank,
            world=env.world_size,
            ep_size=cfg.parallel.ep_size,
            verify=verify_files,
        )
        if problem is not None:
            err = CheckpointError(f"trainer.resume={cfg.trainer.resume!r} is damaged: {problem}")
            err.reported_by_rank0 = True  # type: ignore[attr-defined]  (every rank has the same line)
            raise err
    elif same_layout and (folder / "engine").is_dir():  # written before 2026-11-25 by ZeRO-1/2 or bf16
        if ep.enabled:
            load_engine_state(engine, folder / "engine", env.rank, trust=trust)
        else:  # DeepSpeed's reader unpickles in full: choose() checked these files with code_in_checkpoint
            engine.load_checkpoint(
                str(folder), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
            )
        restored = None
    else:
        restored = load_training_state(model, view, folder, ep, trust=trust)
        if not restored and same_layout:
            raise CheckpointError(f"{folder} has no {OPTIMIZER_FILE}: optimizer state missing")
    if restored is not None:
        if not same_layout:
            log(
                f"note: checkpoint saved with ep_size={state.get('ep_size')} world={state.get('world_size')}, "
                f"resuming with ep_size={cfg.parallel.ep_size} world={env.world_size}: "
                + (
                    "weights and optimizer state resharded"
                    if restored
                    else "weights resharded; warning: optimizer state reinitialised (this older "
                    "checkpoint has per-rank engine files only)"
                )
            )
        engine.global_steps = state["step"]
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for _ in range(state["step"]):  # keep the LR schedule where it was
                scheduler.step()
    saved_max = state.get("max_steps")
    if saved_max is not None and saved_max != cfg.trainer.max_steps:
        log(
            f"note: checkpoint saved with trainer.max_steps={saved_max}, resuming with "
            f"{cfg.trainer.max_steps}: warmup and cosine decay now follow "
            f"{cfg.trainer.max_steps} (lr at step {state['step']}: {scheduler.get_last_lr()[0]:.3g})"
        )
    rank_state = read_rank_state(folder, env.rank, trust=trust) if same_layout else None
    if rank_state is not None:
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
    else:
        loader.load_state_dict(state["loader"])
    if stats_dir is not None and os.environ.get("MOETRAIN_CHECKPOINT_STATS"):  # benchmarks/checkpoint_io.py
        io1 = io_counters()
        rec = {"resume": str(folder), **{k: io1[k] - io0[k] for k in ("rchar", "read_bytes") if k in io1}}
        with open(stats_dir / f"resume_stats_rank_{env.rank}.jsonl", "a") as f:
            f.write(json.dumps({**rec, **memory_kib()}) + "\n")
    log(f"resumed from {folder} at step {state['step']}")
    return state
