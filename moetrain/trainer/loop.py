"""The training loop, readable top to bottom: setup -> (resume) -> steps -> eval -> checkpoint -> sample.

One optimizer step = ``optim.grad_accum`` micro-batches per rank; DeepSpeed scales the loss and
reduces gradients at the boundary. Everything logged is global (mean or sum over data-parallel ranks).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrain.checkpoint.base_ref import KEY as BASE_KEY
from moetrain.checkpoint.checkpointer import Checkpointer
from moetrain.checkpoint.model_file import CheckpointError
from moetrain.checkpoint.optimizer_state import OptimizerView
from moetrain.checkpoint.resume import choose, restore
from moetrain.checkpoint.run_lock import RunLock
from moetrain.checkpoint.save_errors import SavePolicy, disk_check
from moetrain.checkpoint.size import checkpoint_bytes
from moetrain.config import ConfigError, TrainConfig
from moetrain.distributed import (
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    init_distributed,
)
from moetrain.distributed.expert_parallel import build_model, parallelize
from moetrain.model.compile import compile_blocks, compile_unavailable_reason
from moetrain.tracking import CollapseDetector, MetricsFile, RoutingAccumulator, WandbRun, routing_metrics
from moetrain.trainer.engine import build_engine, resolve_dtype, slow_dtype_warning
from moetrain.trainer.guards import NonFiniteGuard, StopRequest, TrainingDiverged
from moetrain.trainer.host_memory import configure_host_allocator
from moetrain.trainer.pretrained_start import check_pretrained_start

# Dense bf16 peak TFLOP/s for MFU on known accelerators; unknown devices (and CPUs) log TFLOP/s only.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _moe_kernel_summary(layer: Any, device: torch.device, dtype: torch.dtype) -> str:
    """Backend and expert GEMM for this device and dtype: what the first forward will run."""
    where = (
        "cpu"
        if device.type == "cpu"
        else f"{torch.cuda.get_device_name(device)} sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    )
    dt = str(dtype).replace("torch.", "")
    if layer.moe_backend == "megablocks":
        gemm = (
            "grouped_gemm.gmm"
            if device.type == "cuda" and dtype == torch.bfloat16
            else "torch matmuls (grouped_gemm is CUDA bf16 only)"
        )
        return f"megablocks permutation + {gemm} ({where}, {dt})"
    impl = layer.experts.resolved_impl(dtype)
    why = {
        "grouped_mm": "torch.nn.functional.grouped_mm",
        "loop": "per-expert matmul loop"
        + (" (this torch has no grouped_mm)" if not hasattr(torch.nn.functional, "grouped_mm") else ""),
    }.get(impl, impl)
    block = layer.experts.resolved_row_block(device, dtype)
    rows = f", rows per expert padded to a multiple of {block}" if block > 1 else ""
    return f"torch dispatch + {why}{rows} ({where}, {dt}; model.moe.expert_impl={layer.experts.impl})"


def _step_line(step: int, max_steps: int, record: dict[str, Any]) -> str:
    """The plain log line of one logged step (console without a progress bar, and train.log)."""
    parts = [f"step {step}/{max_steps}", f"loss {record['loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("grad_norm") is not None:
        parts.append(f"grad_norm {record['grad_norm']:.3f}")
    parts.append(f"{record['tokens_per_sec']:,.0f} tok/s")
    if "moe/max_imbalance" in record:
        parts.append(f"max_imbalance {record['moe/max_imbalance']:.2f}")
    return " | ".join(parts)


def _run_log() -> logging.Logger:
    """Hydra's ``train.log`` (its FileHandler on the root logger), without a second console copy."""
    log = logging.getLogger("moetrain.run")
    if not log.handlers:
        log.propagate = False
        log.setLevel(logging.INFO)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                log.addHandler(handler)
        if not log.handlers:
            log.addHandler(logging.NullHandler())
    return log


def _documents(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The batch's per-token document ids (data.document_masking), on ``device``; None without."""
    ids = batch.get("document_ids")
    return None if ids is None else ids.to(device, non_blocking=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.env: DistEnv = init_distributed(shm_comm=cfg.parallel.shm_comm)
        self.is_main = self.env.is_main
        self.run_dir = self._shared_run_dir(run_dir)
        if self.env.device.type == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # one process per core budget
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
            # Before the data and the model are built. Only where the activations live in host
            # memory: on a GPU node, ranks keeping their host high-water marks (tokenising,
            # checkpoint gathers) would only cost host RAM.
            configure_host_allocator(cfg.parallel.host_allocator)
        if cfg.parallel.compile:  # a missing toolchain would otherwise fail at the first step
            reason = compile_unavailable_reason(self.env.device)
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
        self.step = 0
        self.tokens_seen = 0
        self._bar = None
        # Tests only: MOETRAIN_TEST_NAN_AT_STEP=3,7 makes those steps' loss NaN on every rank.
        self._nan_steps = {int(x) for x in os.environ.get("MOETRAIN_TEST_NAN_AT_STEP", "").split(",") if x}

    # ---- setup ------------------------------------------------------------------------------------
    def _shared_run_dir(self, local: Path) -> Path:
        """Every rank uses rank 0's run dir: Hydra's timestamped default can differ by a second
        between processes. A stray dir Hydra made on another rank (config + log only) is removed."""
        shared = Path(broadcast_object(str(local)))
        if shared != local and local.is_dir() and not any(local.glob("checkpoints")):
            import shutil

            shutil.rmtree(local, ignore_errors=True)
        return shared

    def _log(self, msg: str) -> None:
        if self.is_main:
            if self._bar is not None:  # a line of its own, not glued onto the progress bar
                self._bar.write(msg)
            else:
                print(msg, flush=True)
            _run_log().info(msg)

    def _build_data(self) -> None:
        from moetrain.data import build_data, build_loaders

        # Rank 0 builds (download, tokenizer, packing caches); the others then read the cache.
        if self.is_main:
            self.data = build_data(self.cfg.data)
        barrier()
        if not self.is_main:
            self.data = build_data(self.cfg.data, main_process=False)
        tok_vocab = len(self.data.tokenizer)
        m = self.cfg.model
        if (m.init_from or m.upcycle_from) and m.vocab_size < tok_vocab:
            raise ConfigError(
                f"the tokenizer ({self.cfg.data.tokenizer or 'builtin'}) has {tok_vocab} tokens, more than the "
                f"pretrained model's vocab_size={m.vocab_size}: use the model's own tokenizer (data.tokenizer)"
            )
        if self.cfg.model.vocab_size < tok_vocab:
            padded = int(math.ceil(tok_vocab / 64) * 64)
            self._log(
                f"model.vocab_size={self.cfg.model.vocab_size} < tokenizer size {tok_vocab}: using {padded}"
            )
            self.cfg.model.vocab_size = padded
        o, env = self.cfg.optim, self.env
        # eval_batches spread evenly over each validation split, so every domain is in the eval
        self.train_loader, self.val_loaders = build_loaders(
            self.data,
            self.cfg.data,
            o.micro_batch_size,
            rank=env.rank,
            world_size=env.world_size,
            seed=self.cfg.trainer.seed,
            eval_batches=self.cfg.trainer.eval_batches,
        )
        self._epochs_logged = self.train_loader.epochs()

    def _build_model(self) -> None:
        seed_everything(self.cfg.trainer.seed)  # same init on every rank
        # Meta-device build: each rank allocates and initialises only its own experts, on its device.
        # DeepSpeed's expert groups are consecutive ranks, so the expert-parallel rank is rank % ep.
        ep_size = self.cfg.parallel.ep_size
        model = build_model(self.cfg, self.env.device, self.env.rank % ep_size, ep_size)
        m = self.cfg.model
        if m.init_from or m.upcycle_from:  # this rank's experts only, before DeepSpeed sees the model
            from moetrain.pretrained import load_pretrained

            load_pretrained(
                model, m.init_from or m.upcycle_from, upcycle=bool(m.upcycle_from), noise=m.upcycle_noise
            )
        self.lora_base = None
        if m.lora.rank:  # freeze the base, add the adapters (this rank's experts' only)
            from moetrain.checkpoint.base_ref import base_reference
            from moetrain.model.lora import apply_lora

            apply_lora(model, m.lora)
            self.lora_base = base_reference(m.init_from, self.cfg.trainer.seed)
        model.activation_checkpointing = self.cfg.parallel.activation_checkpointing
        self.ep = parallelize(model, self.cfg, self.env)
        if self.cfg.parallel.zero_stage == 3:  # DeepSpeed's ZeRO-3 expert contract (distributed/zero3.py)
            from moetrain.distributed.zero3 import prepare_zero3

            prepare_zero3(model, self.ep)
        if self.cfg.parallel.compile:  # after parallelize: the all-to-all exchanges stay eager too
            compile_blocks(model)
        self.model = model
        self.dtype = resolve_dtype(self.cfg.parallel.dtype)
        self.engine, _, self.scheduler, ds_config = build_engine(model, self.cfg, self.env.world_size)
        if self.is_main:  # the generated DeepSpeed JSON, for reference and for reuse outside moetrain
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))

    def _print_banner(self) -> None:
        from moetrain.plan import count_params, flops_per_token, plan_summary

        counts = count_params(self.cfg.model)
        self.flops_per_token = flops_per_token(self.cfg.model, self.cfg.data.seq_len)["training"]
        if not self.is_main:
            return
        c = self.cfg
        print(
            f"moetrain: {c.model.name} | {counts['total'] / 1e6:.2f}M total params, "
            f"{counts['active'] / 1e6:.2f}M active per token | world {self.env.world_size} "
            f"(ep {c.parallel.ep_size}, ZeRO-{c.parallel.zero_stage}, {self.env.backend}, {self.dtype}) | run dir {self.run_dir}",
            flush=True,
        )
        warning = slow_dtype_warning(self.env.device, self.dtype)
        if warning:  # printed and kept in train.log
            self._log("  " + warning)
        from moetrain.pretrained import pretrained_summary

        if pretrained_summary(c.model):
            print("  " + pretrained_summary(c.model), flush=True)
        for line in plan_summary(
            c.model,
            ep_size=c.parallel.ep_size,
            dp_size=self.env.world_size,
            zero_stage=c.parallel.zero_stage,
            dtype="bf16" if self.dtype == torch.bfloat16 else "fp32",
            seq_len=c.data.seq_len,
        ):
            print("  " + line, flush=True)
        stats = self.data.stats
        print(
            f"  data: {c.data.name} | {len(self.data.train)} train blocks x {c.data.seq_len + 1} tokens, "
            f"{len(self.data.validation)} validation blocks | global batch "
            f"{c.optim.micro_batch_size * c.optim.grad_accum * self.env.world_size} sequences"
            + (f" | {stats['tokens']} tokens" if "tokens" in stats else ""),
            flush=True,
        )
        if self.data.is_mixture:
            parts = [
                f"{d} {w:.3f} ({len(t)} blocks)"
                for d, w, t in zip(self.data.domains, self.data.weights, self.data.train_sources)
            ]
            print(f"  mixture: {', '.join(parts)} | data.on_exhausted={c.data.on_exhausted}", flush=True)
        if c.data.document_masking:
            print("  document masking: attention inside each document, positions restart", flush=True)
        if c.parallel.compile:
            print(
                "  compile: each block through torch.compile (inductor), experts and token exchange "
                "eager; the first training and evaluation steps compile",
                flush=True,
            )
        if self.model.moe_layers:  # which kernels this run's MoE layers use, and why (logged once)
            print(
                "  moe kernels: "
                + _moe_kernel_summary(self.model.moe_layers[0], self.env.device, self.dtype),
                flush=True,
            )

    # ---- checkpoint / resume (moetrain/checkpoint/ owns both; the loop only calls it) ------------
    def _config_for_checkpoint(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)  # vocab_size as actually built (may follow the tokenizer)

    def _open_run_dir(self) -> tuple[str | None, bool]:
        """Before any expensive work, on rank 0, agreed by all: take the run-dir lock, check the
        disk can hold the checkpoints asked for, choose the checkpoint to resume (checked once)."""
        c = self.cfg.trainer
        sizes = checkpoint_bytes(
            self.cfg.model, ep_size=self.cfg.parallel.ep_size, world_size=self.env.world_size
        )
        self.checkpointer = Checkpointer(
            root=self.run_dir / "checkpoints",
            rank=self.env.rank,
            world_size=self.env.world_size,
            ep_size=self.cfg.parallel.ep_size,
            keep_last=c.keep_last,
            policy=SavePolicy(c.on_save_error, c.max_failed_saves, sizes["total"]),
            async_save=c.async_checkpoint,
            log=self._log,
        )
        answer: tuple = (None, False, None)
        if self.is_main:
            try:
                for line in self.lock.acquire(force=c.force_unlock):
                    self._log(line)
                for line in disk_check(self.run_dir / "checkpoints", sizes["total"], c):
                    self._log(line)
                answer = choose(
                    c.resume,
                    self.checkpointer.manager,
                    self.run_dir,
                    trust=c.trust_checkpoint_code,
                    log=self._log,
                )
            except CheckpointError as e:
                answer = (None, False, str(e))
        target, verify_files, problem = broadcast_object(answer)
        if problem is not None:
            err = CheckpointError(problem)
            err.reported_by_rank0 = True  # type: ignore[attr-defined]
            raise err
        return target, verify_files

    def _optimizer_view(self) -> OptimizerView:
        return OptimizerView(self.model, self.engine.optimizer)

    def _save(self, final: bool = False) -> Path | None:
        """Collective. Never from non-finite weights; a failed write is one line and
        ``trainer.on_save_error`` decides (checkpoint/save_errors.py)."""
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "ep_size": self.cfg.parallel.ep_size,
            "world_size": self.env.world_size,
            "max_steps": self.cfg.trainer.max_steps,
            "skipped_steps": self.nonfinite.total_skipped,
            "loader": self.train_loader.state_dict(),
            **({BASE_KEY: self.lora_base} if self.lora_base else {}),  # LoRA: the base by reference
        }
        return self.checkpointer.save(
            self.step,
            model=self.model,
            view=self._optimizer_view(),
            weights_finite=self._weights_finite(),
            trainer_state=trainer_state,
            loader_state=self.train_loader.state_dict(),
            config=self._config_for_checkpoint(),
            tokenizer=self.data.tokenizer,
            final=final,
        )

    @torch.no_grad()
    def _weights_finite(self) -> bool:
        # ZeRO-3: a parameter's data is empty outside the forward; its partition is ds_tensor
        flags = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in self.model.parameters()]
        return bool(torch.stack(flags).all()) if flags else True

    # ---- one step ---------------------------------------------------------------------------------
    def _train_step(self) -> dict[str, float]:
        # Loss sums stay on the device (no host sync per micro-batch); one all-reduce per step.
        sums = torch.zeros(4, dtype=torch.float32, device=self.env.device)
        lr = self.scheduler.get_last_lr()[0]  # the LR this step uses
        ga = self.cfg.optim.grad_accum
        grad_norm = None
        skipped = False
        for _ in range(ga):
            batch = next(self.train_loader)
            ids = batch["input_ids"].to(self.env.device, non_blocking=True)
            labels = batch["labels"].to(self.env.device, non_blocking=True)
            out = self.engine(ids, labels, document_ids_BT=_documents(batch, self.env.device))
            if self.step + 1 in self._nan_steps:  # test hook: a numeric fault at a chosen step
                out.loss = out.loss * float("nan")
            self.engine.backward(out.loss)
            boundary = self.engine.is_gradient_accumulation_boundary()  # before step() advances it
            sums += torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().float()
            fault = None
            if boundary:
                # Checked before the optimizer step, agreed on by all ranks (one collective): a NaN
                # or inf never reaches the weights. ZeRO-0 also checks the exact global grad norm;
                # ZeRO-1/2 check it inside DeepSpeed (fp32, and bf16's check_grad_overflow).
                grad_norm = self._grad_norm() if self.cfg.parallel.zero_stage == 0 else None
                bad_loss = not bool(torch.isfinite(sums).all())
                bad_norm = grad_norm is not None and not math.isfinite(grad_norm)
                if any_rank(bad_loss or bad_norm):
                    fault = "non-finite loss" if bad_loss else f"non-finite gradient norm ({grad_norm})"
                elif grad_norm is not None:
                    self._clip(grad_norm)
            self._skip_update = fault is not None
            self.engine.step()
            if boundary:
                skipped = fault is not None or not getattr(self.engine, "_step_applied", True)
                if skipped:
                    # DeepSpeed does not advance the schedule on a skipped update; we do, so the
                    # LR keeps following trainer.step (and a resume at another layout replays it).
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        self.scheduler.step()
                    self._log(self.nonfinite.on_fault(self.step + 1, fault or "non-finite gradients"))
                else:
                    self._after_optimizer_step()
            self.routing.add(out.router_stats)
            self.tokens_seen += ids.numel() * self.env.world_size
        loss, lm, aux, z = (all_reduce_mean(sums.double()) / ga).tolist()
        if grad_norm is None and self.engine.get_global_grad_norm() is not None:
            grad_norm = float(self.engine.get_global_grad_norm())
        return {
            "loss": loss,
            "lm_loss": lm,
            "aux_loss": aux,
            "z_loss": z,
            "grad_norm": grad_norm if grad_norm is None or math.isfinite(grad_norm) else None,
            "lr": lr,
            "skipped_step": int(skipped),
            "skipped_steps_total": self.nonfinite.total_skipped,
        }

    def _after_optimizer_step(self) -> None:
        """Model state that follows the optimizer step but is not a parameter (e.g. the routers'
        expert-selection bias of aux-loss-free balancing), updated identically on every rank from
        statistics summed over all data-parallel ranks."""
        hook = getattr(self.model, "after_optimizer_step", None)
        if hook is not None:
            hook(all_reduce=all_reduce_sum)

    @torch.no_grad()
    def _grad_norm(self) -> float | None:
        """Global L2 norm of the (already reduced) gradients.

        Expert shards are summed over the expert-parallel group and replicated params counted once,
        so the norm (and the clipping) equals a single process's on the same global batch. Squares are
        summed in float64 on the gradients' device; one host sync per optimizer step (the norm)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return None
        zero = torch.zeros((), dtype=torch.float64, device=params[0].grad.device)
        dense, expert = zero.clone(), zero.clone()
        for p in params:
            # float64 accumulation without a float64 copy of the gradient (5x cheaper than .double())
            sq = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64).square()
            if getattr(p, "allreduce", True) is False:
                expert += sq
            else:
                dense += sq
        if self.ep.enabled:
            expert = all_reduce_sum(expert, self.ep.group)
        return math.sqrt(float(dense + expert))

    @torch.no_grad()
    def _clip(self, norm: float) -> None:
        clip = self.cfg.optim.grad_clip
        if clip > 0 and norm > clip:
            coef = clip / (norm + 1e-6)
            torch._foreach_mul_([p.grad for p in self.model.parameters() if p.grad is not None], coef)

    def _install_update_guard(self) -> None:
        """Let the loop veto one optimizer update (non-finite step) through DeepSpeed's own skip path:
        the optimizer reports ``overflow`` and the engine counts a skipped step, zeroes the grads and
        leaves the weights and the optimizer state untouched."""
        opt = self.engine.optimizer
        real_step = opt.step
        self._skip_update = False

        @functools.wraps(real_step)  # keeps torch's LR-scheduler marker (no "step() overridden" warning)
        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if not self._skip_update:
                if not hasattr(opt, "check_grad_overflow"):  # DeepSpeed's ZeRO sets its own flag
                    opt.overflow = False
                return real_step(*args, **kwargs)
            opt.overflow = True
            for key in list(getattr(opt, "averaged_gradients", {}) or {}):  # ZeRO-1/2 reduced partitions
                opt.averaged_gradients[key] = None
            return None

        opt.step = guarded_step

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``val_loss`` over every validation token; with a mixture also ``val_loss/<domain>``."""
        self.engine.eval()
        sums = torch.zeros(len(self.val_loaders), 2, dtype=torch.float64, device=self.env.device)
        for i, loader in enumerate(self.val_loaders.values()):
            for batch in loader:
                dev = self.env.device
                out = self.engine(
                    batch["input_ids"].to(dev),
                    batch["labels"].to(dev),
                    document_ids_BT=_documents(batch, dev),
                )
                n = batch["labels"].numel()
                sums[i] += torch.stack([out.lm_loss.detach().double() * n, sums.new_tensor(float(n))])
        self.engine.train()
        sums = all_reduce_sum(sums).cpu()
        total = sums.sum(dim=0)
        if total[1] == 0:
            return {}
        val = float(total[0] / total[1])
        record = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        for domain, (loss_sum, n) in zip(self.val_loaders, sums.tolist()):
            if domain and n:
                record[f"val_loss/{domain}"] = loss_sum / n
        return record

    def _data_record(self) -> dict[str, Any]:
        """Mixtures: cumulative training tokens and completed epochs per source (global: the
        loader's state is the same on every rank); a line when a source starts another epoch."""
        loader = self.train_loader
        if not hasattr(loader, "tokens_by_domain"):
            return {}
        epochs = loader.epochs()
        for domain, epoch in epochs.items():
            if epoch > self._epochs_logged.get(domain, 0):
                self._log(
                    f"data: source {domain!r} read to its end, epoch {epoch + 1} begins (data.on_exhausted=repeat)"
                )
        self._epochs_logged = epochs
        record: dict[str, Any] = {f"data/tokens/{d}": n for d, n in loader.tokens_by_domain().items()}
        record.update({f"data/epochs/{d}": e for d, e in epochs.items()})
        return record

    # ---- logging ----------------------------------------------------------------------------------
    def _routing_record(self) -> dict[str, Any]:
        if not self.model.moe_layers:
            return {}
        flat = all_reduce_sum(self.routing.packed()).cpu()
        counts, entropy, dropped, forwards = self.routing.unpack(flat)
        forwards = forwards / self.env.world_size
        self.routing.reset()
        metrics = routing_metrics(
            self.cfg.model.moe_layer_ids, counts, entropy / self.env.world_size, dropped, forwards
        )
        self._last_counts = counts
        fractions = {
            layer: metrics[f"moe/layer_{layer}/expert_fraction"]
            for layer in self.cfg.model.moe_layer_ids
            if f"moe/layer_{layer}/expert_fraction" in metrics
        }
        for msg in self.collapse.update(fractions):
            self._log(f"warning: {msg}")
            self.wandb.alert("routing collapse", msg)
        metrics.update(getattr(self.model, "routing_state_metrics", dict)())  # e.g. the expert bias
        return metrics

    def _heatmap(self, path: Path | None = None, step: int | None = None) -> None:
        counts = getattr(self, "_last_counts", None)
        if counts is None or not self.is_main:
            return
        from moetrain.tracking.plots import expert_heatmap

        fig = expert_heatmap(
            counts, self.cfg.model.moe_layer_ids, title=f"tokens per expert, step {self.step}"
        )
        if step is not None:
            self.wandb.log_image("moe/heatmap", fig, step=step)
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)

    # ---- the run ----------------------------------------------------------------------------------
    def _check_run_dir_writable(self) -> None:
        """Before any expensive work: a run that could never save must not start. Probes the
        checkpoint folder when it exists (where saves go), else the run dir (creating nothing more)."""
        ckpts = self.run_dir / "checkpoints"
        folder = ckpts if ckpts.exists() or ckpts.is_symlink() else self.run_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)  # FileExistsError if it is a file
            probe = folder / f".write-test-{self.env.rank}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(
                f"{folder} is not writable ({e.strerror}); fix: choose another "
                "hydra.run.dir or fix its permissions"
            ) from None

    def _log_step(self, record: dict[str, Any]) -> None:
        """One plain line per log step (what a cluster log shows), unless the progress bar shows it."""
        if not self.is_main:
            return
        if self.cfg.logging.progress:
            _run_log().info(_step_line(self.step, self.cfg.trainer.max_steps, record))
            if "val_loss" in record:
                self._log(
                    f"step {self.step}: val_loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})"
                )
            return
        self._log(_step_line(self.step, self.cfg.trainer.max_steps, record))

    def run(self) -> int:
        self._check_run_dir_writable()
        self.lock = RunLock(self.run_dir)
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> int:
        c = self.cfg
        # Before any expensive work, chosen and checked once (rank 0): a busy run dir, a disk too
        # small, a wrong, damaged or code-carrying checkpoint stop every rank with the same line.
        target, verify_files = self._open_run_dir()
        self._build_data()
        self._build_model()
        self._install_update_guard()
        self._print_banner()
        self.nonfinite = NonFiniteGuard(
            c.trainer.on_nonfinite, c.trainer.max_skipped_steps, c.trainer.skip_window
        )
        if target is not None:
            state = restore(
                Path(target),
                cfg=c,
                env=self.env,
                ep=self.ep,
                model=self.model,
                view=self._optimizer_view(),
                engine=self.engine,
                scheduler=self.scheduler,
                loader=self.train_loader,
                verify_files=verify_files,
                log=self._log,
                stats_dir=self.run_dir,
                lora_base=self.lora_base,
            )
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self._epochs_logged = self.train_loader.epochs()
        else:
            seed_everything(c.trainer.seed + self.env.rank)  # per-rank stream for jitter etc.

        self.routing = RoutingAccumulator(c.model.moe_layer_ids, c.model.num_experts, self.env.device)
        self.collapse = CollapseDetector(c.logging.collapse_threshold, c.logging.collapse_window)
        self.metrics = MetricsFile(
            self.run_dir / "metrics.jsonl", enabled=self.is_main, resume_step=self.step if self.step else None
        )
        self.wandb = WandbRun(
            c.logging.wandb, self.run_dir, self._config_for_checkpoint(), enabled=self.is_main
        )
        peak = _peak_tflops(self.env.device)
        stop_step = c.trainer.stop_at or c.trainer.max_steps
        window_start, window_tokens = time.time(), self.tokens_seen
        if self.is_main and c.logging.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=c.trainer.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        if target in (None, "None"):  # a pretrained start is evaluated (and checked) before step 1
            check_pretrained_start(self)
        stopper = StopRequest(c.trainer.stop_signals, c.trainer.stop_after_minutes)
        stopper.install()
        self.engine.train()
        stop_reason = None
        # resumed at (or past) the stop step: nothing to train, the checkpoint resumed from is the last
        last_saved: Path | None = Path(target) if target is not None and self.step >= stop_step else None
        try:
            while self.step < stop_step:
                record = self._train_step()
                self.step += 1
                if self._bar is not None:
                    self._bar.update(1)
                    self._bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
                last = self.step == stop_step
                stop_reason = None if last else stopper.poll()  # one collective: all ranks agree
                if stop_reason is None and not last and c.data.on_exhausted == "stop":
                    # the loader's state is global, so every rank reaches the same answer
                    exhausted = self.train_loader.exhausted_within(c.optim.grad_accum)
                    if exhausted is not None:
                        stop_reason = f"{exhausted} is read to its end (data.on_exhausted=stop)"
                last = last or stop_reason is not None
                do_eval = bool(c.trainer.eval_every) and (self.step % c.trainer.eval_every == 0 or last)
                if (c.trainer.log_every and self.step % c.trainer.log_every == 0) or last or do_eval:
                    now = time.time()
                    tps = (self.tokens_seen - window_tokens) / max(now - window_start, 1e-9)
                    record.update(step=self.step, tokens=self.tokens_seen, tokens_per_sec=tps)
                    if self.flops_per_token:
                        record["tflops"] = tps * self.flops_per_token / 1e12
                        if peak:
                            record["mfu"] = record["tflops"] / (peak * self.env.world_size)
                    record.update(self._routing_record())
                    record.update(self._data_record())
                    if do_eval:
                        record.update(self.evaluate())
                    window_start, window_tokens = time.time(), self.tokens_seen  # eval/logging excluded
                    if self._bar is not None:
                        self._bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    self._log_step(record)
                    self.metrics.write(record)
                    self.wandb.log(record, step=self.step)
                    if c.logging.heatmap_every and self.step % c.logging.heatmap_every == 0:
                        self._heatmap(step=self.step)
                if (c.trainer.checkpoint_every and self.step % c.trainer.checkpoint_every == 0) or last:
                    # the last save is synchronous; others stage and write in the background
                    last_saved = self._save(final=last) or self.checkpointer.last_saved or last_saved
                    window_start = time.time()  # checkpoint time is not training throughput
                if stop_reason is not None:
                    break
        except TrainingDiverged:
            # The faulty update was not applied: the weights are those of the last good step.
            self._close_bar()
            if self._save(final=True) is not None:
                self._log(f"checkpoint of step {self.step} (weights before the faulty update) saved")
            self.metrics.close()
            self.wandb.finish()
            raise
        finally:
            stopper.uninstall()
        self.checkpointer.close()  # nothing in flight past this point
        last_saved = self.checkpointer.last_saved or last_saved
        self._close_bar()
        if self.is_main:
            self._heatmap(path=self.run_dir / "routing_heatmap.png", step=self.step)
        where = f"checkpoint {last_saved}" if last_saved else "no checkpoint could be written"
        if stop_reason is not None:
            self._log(
                f"stopped at step {self.step} of {c.trainer.max_steps}: {stop_reason}; {where}; "
                "continue with trainer.resume=auto (same hydra.run.dir)"
            )
        elif self.step < c.trainer.max_steps:
            self._log(
                f"stopped at step {self.step} of {c.trainer.max_steps} (trainer.stop_at; the LR schedule "
                f"runs to {c.trainer.max_steps}); {where}; continue with trainer.resume=auto"
            )
        else:
            self._sample()
        self.metrics.close()
        self.wandb.finish()
        barrier()
        if last_saved is None:
            self._log("error: the final checkpoint could not be written (see above); older ones are kept")
            return 1
        return 0

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _sample(self) -> None:
        """A short generation at the end, so a newcomer sees what the model learned."""
        if not self.is_main or not self.cfg.trainer.sample_tokens:
            return
        if self.ep.enabled or self.cfg.parallel.zero_stage == 3:  # the weights are spread over ranks
            how = "expert parallelism" if self.ep.enabled else "ZeRO-3"
            self._log(f"sample: skipped under {how}; run python -m moetrain.generate {self.run_dir}")
            return
        if not self._weights_finite():
            self._log("sample: skipped (the weights are not finite)")
            return
        from moetrain.generate import encode_prompt, generate_tokens

        tok = self.data.tokenizer
        ids = torch.tensor([encode_prompt(tok, self.cfg.trainer.sample_prompt)], device=self.env.device)
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.trainer.seed)
        try:
            out = generate_tokens(
                self.model, ids, self.cfg.trainer.sample_tokens, temperature=0.8, top_p=0.95, generator=gen
            )
        except RuntimeError as e:  # e.g. non-finite probabilities: a numeric fault is not a crash
            self._log(f"sample: skipped ({str(e).splitlines()[0]})")
            return
        text = tok.decode(out[0].tolist(), skip_special_tokens=True)
        print(f"sample: {text!r}", flush=True)
        (self.run_dir / "sample.txt").write_text(text + "\n")
