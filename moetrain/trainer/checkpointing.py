"""The loop's calls into moetrain/checkpoint/, which owns saving and resuming: before any expensive
work the run dir is checked, locked and the checkpoint to resume chosen (rank 0, agreed by all);
then the trainer's state is restored from it, and saved at the checkpoint steps."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetrain.checkpoint.base_ref import KEY as BASE_KEY
from moetrain.checkpoint.checkpointer import Checkpointer
from moetrain.checkpoint.model_file import CheckpointError
from moetrain.checkpoint.optimizer_state import OptimizerView
from moetrain.checkpoint.resume import choose, restore
from moetrain.checkpoint.run_lock import RunLock
from moetrain.checkpoint.save_errors import SavePolicy, disk_check
from moetrain.checkpoint.size import checkpoint_bytes
from moetrain.distributed import broadcast_object
from moetrain.trainer.guards import weights_finite

if TYPE_CHECKING:
    from moetrain.trainer.loop import Trainer


def config_for_checkpoint(trainer: Trainer) -> dict[str, Any]:
    return dataclasses.asdict(trainer.cfg)  # vocab_size as actually built (may follow the tokenizer)


def check_run_dir_writable(run_dir: Path, rank: int) -> None:
    """Before any expensive work: a run that could never save must not start. Probes the
    checkpoint folder when it exists (where saves go), else the run dir (creating nothing more)."""
    ckpts = run_dir / "checkpoints"
    folder = ckpts if ckpts.exists() or ckpts.is_symlink() else run_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)  # FileExistsError if it is a file
        probe = folder / f".write-test-{rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"{folder} is not writable ({e.strerror}); fix: choose another "
            "hydra.run.dir or fix its permissions"
        ) from None


def open_run_dir(trainer: Trainer, lock: RunLock) -> tuple[Checkpointer, str | None, bool]:
    """Before any expensive work, on rank 0, agreed by all: take the run-dir lock, check the disk
    can hold the checkpoints asked for, choose the checkpoint to resume (checked once). A busy run
    dir, a disk too small, a wrong, damaged or code-carrying checkpoint stop every rank with the
    same line. Returns the checkpointer, the checkpoint to resume (or None) and whether its files
    still need hashing."""
    cfg, env, log = trainer.cfg, trainer.env, trainer.log
    c = cfg.trainer
    sizes = checkpoint_bytes(cfg.model, ep_size=cfg.parallel.ep_size, world_size=env.world_size)
    checkpointer = Checkpointer(
        root=trainer.run_dir / "checkpoints",
        rank=env.rank,
        world_size=env.world_size,
        ep_size=cfg.parallel.ep_size,
        keep_last=c.keep_last,
        policy=SavePolicy(c.on_save_error, c.max_failed_saves, sizes["total"]),
        async_save=c.async_checkpoint,
        log=log,
    )
    answer: tuple = (None, False, None)
    if env.is_main:
        try:
            for line in lock.acquire(force=c.force_unlock):
                log(line)
            for line in disk_check(trainer.run_dir / "checkpoints", sizes["total"], c):
                log(line)
            answer = choose(
                c.resume, checkpointer.manager, trainer.run_dir, trust=c.trust_checkpoint_code, log=log
            )
        except CheckpointError as e:
            answer = (None, False, str(e))
    target, verify_files, problem = broadcast_object(answer)
    if problem is not None:
        err = CheckpointError(problem)
        err.reported_by_rank0 = True  # type: ignore[attr-defined]
        raise err
    return checkpointer, target, verify_files


def restore_run(trainer: Trainer, target: str, verify_files: bool) -> dict[str, Any]:
    """Collective: weights, optimizer state, schedule, loader position and RNG streams; returns the
    saved trainer state (``step``, ``tokens_seen``, ...)."""
    return restore(
        Path(target),
        cfg=trainer.cfg,
        env=trainer.env,
        ep=trainer.ep,
        model=trainer.model,
        view=OptimizerView(trainer.model, trainer.engine.optimizer),
        engine=trainer.engine,
        scheduler=trainer.scheduler,
        loader=trainer.train_loader,
        verify_files=verify_files,
        log=trainer.log,
        stats_dir=trainer.run_dir,
        lora_base=trainer.lora_base,
    )


def save(trainer: Trainer, final: bool = False) -> Path | None:
    """Collective. Never from non-finite weights; a failed write is one line and
    ``trainer.on_save_error`` decides (checkpoint/save_errors.py)."""
    cfg = trainer.cfg
    loader = trainer.train_loader.state_dict()  # rank 0's copy also goes into trainer_state.json
    trainer_state = {
        "step": trainer.step,
        "tokens_seen": trainer.tokens_seen,
        "ep_size": cfg.parallel.ep_size,
        "world_size": trainer.env.world_size,
        "max_steps": cfg.trainer.max_steps,
        "skipped_steps": trainer.nonfinite.total_skipped,
        "loader": loader,
        **({BASE_KEY: trainer.lora_base} if trainer.lora_base else {}),  # LoRA: the base by reference
    }
    return trainer.checkpointer.save(
        trainer.step,
        model=trainer.model,
        view=OptimizerView(trainer.model, trainer.engine.optimizer),
        weights_finite=weights_finite(trainer.model),
        trainer_state=trainer_state,
        loader_state=loader,
        config=config_for_checkpoint(trainer),
        tokenizer=trainer.data.tokenizer,
        final=final,
    )
