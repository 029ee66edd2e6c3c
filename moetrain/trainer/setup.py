"""Everything before the first step, in the order a run needs it: the process (threads, host allocator,
compile toolchain, determinism, a test hook), the run dir every rank shares, the data (which may widen
the model's vocabulary), then the model and its DeepSpeed engine."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrain.config import ConfigError, TrainConfig
from moetrain.distributed import DistEnv, barrier, broadcast_object
from moetrain.distributed.expert_parallel import build_model as build_local_model
from moetrain.distributed.expert_parallel import parallelize
from moetrain.model.compile import compile_blocks, compile_unavailable_reason
from moetrain.trainer.engine import build_engine, deepspeed_config, resolve_dtype
from moetrain.trainer.host_memory import configure_host_allocator


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_process(cfg: TrainConfig, device: torch.device) -> None:
    """Threads, host allocator, compile toolchain and determinism: before any data or model work."""
    if device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # one process per core budget
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        # Before the data and the model are built. Only where the activations live in host
        # memory: on a GPU node, ranks keeping their host high-water marks (tokenising,
        # checkpoint gathers) would only cost host RAM.
        configure_host_allocator(cfg.parallel.host_allocator)
    if cfg.parallel.compile:  # a missing toolchain would otherwise fail at the first step
        reason = compile_unavailable_reason(device)
        if reason:
            raise ConfigError(
                f"parallel.compile=true is invalid on this machine: {reason}; fix: install it, or "
                "set parallel.compile=false (the eager blocks compute the same)"
            )
    if cfg.trainer.deterministic:
        # Same losses for the same seed, run after run, and bitwise resume, on CPU and CUDA alike.
        # warn_only=False: an op without a deterministic kernel raises instead of silently breaking
        # the promise (with warn_only=True, SDPA's CUDA backward stays non-deterministic).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=False)
        # Deterministic mode also fills every new tensor with NaN, a debugging aid that costs one
        # pass over each allocation (the logits, every gradient, every optimizer temporary).
        # Results do not depend on it: no op reads memory it has not written (tested with the
        # fill on, tests/model/test_transformer.py).
        torch.utils.deterministic.fill_uninitialized_memory = False


def nan_test_steps() -> set[int]:
    """Tests only: MOETRAIN_TEST_NAN_AT_STEP=3,7 makes those steps' loss NaN on every rank."""
    return {int(x) for x in os.environ.get("MOETRAIN_TEST_NAN_AT_STEP", "").split(",") if x}


def shared_run_dir(local: Path) -> Path:
    """Every rank uses rank 0's run dir: Hydra's timestamped default can differ by a second
    between processes. A stray dir Hydra made on another rank (config + log only) is removed."""
    shared = Path(broadcast_object(str(local)))
    if shared != local and local.is_dir() and not any(local.glob("checkpoints")):
        shutil.rmtree(local, ignore_errors=True)
    return shared


def build_data(cfg: TrainConfig, env: DistEnv, log: Callable[[str], None]) -> tuple[Any, Any, Any]:
    """The data bundle, the training loader and the validation loaders (by domain). Widens
    ``cfg.model.vocab_size`` to the tokenizer's (rounded up to 64) when it is smaller."""
    from moetrain.data import build_data as build_bundle
    from moetrain.data import build_loaders

    # Rank 0 builds (download, tokenizer, packing caches); the others then read the cache.
    if env.is_main:
        data = build_bundle(cfg.data)
    barrier()
    if not env.is_main:
        data = build_bundle(cfg.data, main_process=False)
    tok_vocab = len(data.tokenizer)
    m = cfg.model
    if (m.init_from or m.upcycle_from) and m.vocab_size < tok_vocab:
        raise ConfigError(
            f"the tokenizer ({cfg.data.tokenizer or 'builtin'}) has {tok_vocab} tokens, more than the "
            f"pretrained model's vocab_size={m.vocab_size}: use the model's own tokenizer (data.tokenizer)"
        )
    if m.vocab_size < tok_vocab:
        padded = int(math.ceil(tok_vocab / 64) * 64)
        log(f"model.vocab_size={m.vocab_size} < tokenizer size {tok_vocab}: using {padded}")
        m.vocab_size = padded
    # eval_batches spread evenly over each validation split, so every domain is in the eval
    train_loader, val_loaders = build_loaders(
        data,
        cfg.data,
        cfg.optim.micro_batch_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.trainer.seed,
        eval_batches=cfg.trainer.eval_batches,
    )
    return data, train_loader, val_loaders


@dataclass
class BuiltModel:
    model: Any  # the MoETransformer (this rank's experts)
    ep: Any  # the expert-parallel state (distributed/expert_parallel.py)
    lora_base: dict[str, Any] | None  # a LoRA run's base by reference (checkpoint/base_ref.py)
    dtype: torch.dtype
    engine: Any
    scheduler: Any


def build_model(cfg: TrainConfig, env: DistEnv, run_dir: Path) -> BuiltModel:
    """The model (pretrained weights, LoRA, parallelism, compile applied) and its DeepSpeed engine."""
    seed_everything(cfg.trainer.seed)  # same init on every rank
    m = cfg.model
    dtype = resolve_dtype(cfg.parallel.dtype)
    if cfg.parallel.zero_stage == 3 and not m.lora.rank:
        model, ep = _build_partitioned(cfg, env, dtype)
        lora_base = None
    else:
        model, ep, lora_base = _build_whole(cfg, env)
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    if cfg.parallel.compile:  # after parallelize: the all-to-all exchanges stay eager too
        compile_blocks(model)
    engine, _, scheduler, ds_config = build_engine(model, cfg, env.world_size)
    if env.is_main:  # the generated DeepSpeed JSON, for reference and for reuse outside moetrain
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    return BuiltModel(model, ep, lora_base, dtype, engine, scheduler)


def _load_pretrained(cfg: TrainConfig, model: Any) -> None:
    m = cfg.model
    if m.init_from or m.upcycle_from:  # this rank's experts (or partitions) only
        from moetrain.pretrained import load_pretrained

        load_pretrained(
            model, m.init_from or m.upcycle_from, upcycle=bool(m.upcycle_from), noise=m.upcycle_noise
        )


def _build_whole(cfg: TrainConfig, env: DistEnv) -> tuple[Any, Any, dict[str, Any] | None]:
    """Every parameter of this rank's experts and the dense layers, on every rank (ZeRO 0-2; ZeRO-3
    with LoRA, partitioned by DeepSpeed's engine afterwards)."""
    # Meta-device build: each rank allocates and initialises only its own experts, on its device.
    # DeepSpeed's expert groups are consecutive ranks, so the expert-parallel rank is rank % ep.
    ep_size = cfg.parallel.ep_size
    model = build_local_model(cfg, env.device, env.rank % ep_size, ep_size)
    _load_pretrained(cfg, model)  # before DeepSpeed sees the model
    lora_base = None
    if cfg.model.lora.rank:  # freeze the base, add the adapters (this rank's experts' only)
        from moetrain.checkpoint.base_ref import base_reference
        from moetrain.model.lora import apply_lora

        apply_lora(model, cfg.model.lora)
        lora_base = base_reference(cfg.model.init_from, cfg.trainer.seed)
    ep = parallelize(model, cfg, env)
    if cfg.parallel.zero_stage == 3:  # DeepSpeed's ZeRO-3 expert contract (distributed/zero3.py)
        from moetrain.distributed.zero3 import prepare_zero3

        prepare_zero3(model, ep)
    return model, ep, lora_base


def _build_partitioned(cfg: TrainConfig, env: DistEnv, dtype: torch.dtype) -> tuple[Any, Any]:
    """ZeRO-3: each parameter partitioned as it is made, never the whole model on a rank
    (distributed/zero3.py); the pretrained weights are written into the partitions."""
    from moetrain.distributed.zero3 import build_partitioned, cast_partitions

    model, ep = build_partitioned(cfg, env, deepspeed_config(cfg, env.world_size, env.device))
    _load_pretrained(cfg, model)
    cast_partitions(model, dtype)
    return model, ep
