"""The training loop, readable top to bottom: setup -> (resume) -> steps -> eval -> checkpoint -> sample.

One optimizer step = ``optim.grad_accum`` micro-batches per rank; DeepSpeed scales the loss and
reduces gradients at the boundary. Everything logged is global (mean or sum over data-parallel ranks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrain.checkpoint.manager import CheckpointManager, read_rank_state, read_trainer_state, set_rng_state
from moetrain.checkpoint.model_file import CheckpointError, resolve_checkpoint
from moetrain.checkpoint.optimizer_state import load_full_optimizer_state, save_full_optimizer_state
from moetrain.config import TrainConfig
from moetrain.distributed import (
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
)
from moetrain.distributed.expert_parallel import (
    build_model,
    full_state_dict,
    load_engine_state,
    load_full_state_dict,
    parallelize,
)
from moetrain.tracking import CollapseDetector, MetricsFile, RoutingAccumulator, WandbRun, routing_metrics
from moetrain.trainer.engine import build_engine, resolve_dtype

# Dense bf16 peak TFLOP/s for MFU on known accelerators; unknown devices (and CPUs) log TFLOP/s only.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


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
        if self.env.device.type == "cpu":  # one process per core budget; no oversubscription
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if cfg.trainer.deterministic:
            # Same losses for the same seed, run after run, and bitwise resume, on CPU and CUDA alike.
            # warn_only=False: an op without a deterministic kernel raises instead of silently breaking
            # the promise (with warn_only=True, SDPA's CUDA backward stays non-deterministic).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=False)
        self.step = 0
        self.tokens_seen = 0

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
            print(msg, flush=True)

    def _build_data(self) -> None:
        from moetrain.data import ResumableLoader, ValidationLoader, build_data

        # Rank 0 builds (download, tokenizer, packing caches); the others then read the cache.
        if self.is_main:
            self.data = build_data(self.cfg.data)
        barrier()
        if not self.is_main:
            self.data = build_data(self.cfg.data, main_process=False)
        tok_vocab = len(self.data.tokenizer)
        if self.cfg.model.vocab_size < tok_vocab:
            padded = int(math.ceil(tok_vocab / 64) * 64)
            self._log(
                f"model.vocab_size={self.cfg.model.vocab_size} < tokenizer size {tok_vocab}: using {padded}"
            )
            self.cfg.model.vocab_size = padded
        o, env = self.cfg.optim, self.env
        self.train_loader = ResumableLoader(
            self.data.train,
            o.micro_batch_size,
            rank=env.rank,
            world_size=env.world_size,
            seed=self.cfg.trainer.seed,
        )
        # eval_batches spread evenly over the whole validation split, so every domain is in the eval
        self.val_loader = ValidationLoader(
            self.data.validation,
            o.micro_batch_size,
            rank=env.rank,
            world_size=env.world_size,
            num_batches=self.cfg.trainer.eval_batches,
        )

    def _build_model(self) -> None:
        seed_everything(self.cfg.trainer.seed)  # same init on every rank
        # Meta-device build: each rank allocates and initialises only its own experts, on its device.
        # DeepSpeed's expert groups are consecutive ranks, so the expert-parallel rank is rank % ep.
        ep_size = self.cfg.parallel.ep_size
        model = build_model(self.cfg, self.env.device, self.env.rank % ep_size, ep_size)
        model.activation_checkpointing = self.cfg.parallel.activation_checkpointing
        self.ep = parallelize(model, self.cfg, self.env)
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

    # ---- checkpoint / resume ----------------------------------------------------------------------
    def _config_for_checkpoint(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)  # vocab_size as actually built (may follow the tokenizer)

    def _resume_target(self) -> Path | None:
        r = self.cfg.trainer.resume
        if r is None:
            return None
        if r == "auto":
            latest = self.ckpt.latest()
            if latest is None:
                self._log("trainer.resume=auto: no checkpoint in this run dir yet, starting from scratch")
            return latest
        try:
            return resolve_checkpoint(r)
        except CheckpointError as e:
            raise CheckpointError(f"trainer.resume={r!r}: {e}") from None

    def _resume(self, folder: Path) -> None:
        state = read_trainer_state(folder)
        same_layout = (
            state.get("ep_size") == self.cfg.parallel.ep_size
            and state.get("world_size") == self.env.world_size
        )
        if same_layout and self.ep.enabled:
            load_engine_state(self.engine, folder / "engine", self.env.rank)
        elif same_layout:
            self.engine.load_checkpoint(
                str(folder), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
            )
        else:
            # Another parallel layout: weights come from the layout-free model file (exact); the
            # optimizer state is per-rank and layout-specific, so it restarts (see docs/EXPERT_PARALLEL.md).
            from safetensors.torch import load_file

            load_full_state_dict(self.model, load_file(str(folder / "model.safetensors")), self.env, self.ep)
            refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
            if refresh is not None:  # ZeRO / bf16 keep fp32 master copies of the weights
                refresh()
            restored = self._plain_optimizer() and load_full_optimizer_state(
                self.model, self.engine.optimizer, folder, self.ep
            )
            self._log(
                f"note: checkpoint saved with ep_size={state.get('ep_size')} world={state.get('world_size')}, "
                f"resuming with ep_size={self.cfg.parallel.ep_size} world={self.env.world_size}: weights restored "
                + (
                    "exactly, optimizer state resharded"
                    if restored
                    else "exactly; warning: optimizer state reinitialised (ZeRO-1/2 and bf16 state is per-rank)"
                )
            )
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore")
                for _ in range(state["step"]):  # keep the LR schedule where it was
                    self.scheduler.step()
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        rank_state = read_rank_state(folder, self.env.rank) if same_layout else None
        if rank_state is not None:
            self.train_loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
        else:
            self.train_loader.load_state_dict(state["loader"])
        self._log(f"resumed from {folder} at step {self.step}")

    def _plain_optimizer(self) -> bool:
        """ZeRO-0 fp32 keeps a plain torch optimizer whose state we can reshard across ep sizes."""
        return not type(self.engine.optimizer).__module__.startswith("deepspeed")

    def _save_layout_free_optimizer(self, folder: Path) -> None:
        if self._plain_optimizer():
            save_full_optimizer_state(self.model, self.engine.optimizer, folder, self.env.rank, self.ep)

    def _save(self) -> Path:
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "ep_size": self.cfg.parallel.ep_size,
            "world_size": self.env.world_size,
            "loader": self.train_loader.state_dict(),
        }
        sd = full_state_dict(self.model, self.env, self.ep)
        path = self.ckpt.save(
            step=self.step,
            engine=self.engine,
            full_state_dict=sd,
            config=self._config_for_checkpoint(),
            trainer_state=trainer_state,
            rank_state={"loader": self.train_loader.state_dict()},
            tokenizer=self.data.tokenizer,
            sharded_experts=self.ep.enabled,
            save_extra=self._save_layout_free_optimizer,
        )
        self._log(f"checkpoint saved: {path}")
        return path

    # ---- one step ---------------------------------------------------------------------------------
    def _train_step(self) -> dict[str, float]:
        # Loss sums stay on the device (no host sync per micro-batch); one all-reduce per step.
        sums = torch.zeros(4, dtype=torch.float32, device=self.env.device)
        lr = self.scheduler.get_last_lr()[0]  # the LR this step uses
        ga = self.cfg.optim.grad_accum
        grad_norm = None
        for _ in range(ga):
            batch = next(self.train_loader)
            ids = batch["input_ids"].to(self.env.device, non_blocking=True)
            labels = batch["labels"].to(self.env.device, non_blocking=True)
            out = self.engine(ids, labels)
            self.engine.backward(out.loss)
            boundary = self.engine.is_gradient_accumulation_boundary()  # before step() advances it
            if boundary and self.cfg.parallel.zero_stage == 0:
                grad_norm = self._clip_gradients()  # ZeRO-1/2 clip inside DeepSpeed and report the norm
            self.engine.step()
            if boundary:
                self._after_optimizer_step()
            self.routing.add(out.router_stats)
            sums += torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().float()
            self.tokens_seen += ids.numel() * self.env.world_size
        loss, lm, aux, z = (all_reduce_mean(sums.double()) / ga).tolist()
        if grad_norm is None and self.engine.get_global_grad_norm() is not None:
            grad_norm = float(self.engine.get_global_grad_norm())
        return {
            "loss": loss,
            "lm_loss": lm,
            "aux_loss": aux,
            "z_loss": z,
            "grad_norm": grad_norm,
            "lr": lr,
        }

    def _after_optimizer_step(self) -> None:
        """Model state that follows the optimizer step but is not a parameter (e.g. the routers'
        expert-selection bias of aux-loss-free balancing), updated identically on every rank from
        statistics summed over all data-parallel ranks."""
        hook = getattr(self.model, "after_optimizer_step", None)
        if hook is not None:
            hook(all_reduce=all_reduce_sum)

    @torch.no_grad()
    def _clip_gradients(self) -> float | None:
        """Global L2 norm of the (already reduced) gradients, then clip to ``optim.grad_clip``.

        Expert shards are summed over the expert-parallel group and replicated params counted once,
        so the norm (and the clipping) equals a single process's on the same global batch. Squares are
        summed in float64 on the gradients' device; one host sync per optimizer step (the norm)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return None
        zero = torch.zeros((), dtype=torch.float64, device=params[0].grad.device)
        dense, expert = zero.clone(), zero.clone()
        for p in params:
            sq = p.grad.detach().double().pow(2).sum()
            if getattr(p, "allreduce", True) is False:
                expert += sq
            else:
                dense += sq
        if self.ep.enabled:
            expert = all_reduce_sum(expert, self.ep.group)
        norm = math.sqrt(float(dense + expert))
        clip = self.cfg.optim.grad_clip
        if clip > 0 and norm > clip:
            coef = clip / (norm + 1e-6)
            for p in params:
                p.grad.mul_(coef)
        return norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for batch in self.val_loader:
            out = self.engine(batch["input_ids"].to(self.env.device), batch["labels"].to(self.env.device))
            n = batch["labels"].numel()
            total += torch.stack([out.lm_loss.detach().double() * n, total.new_tensor(float(n))])
        self.engine.train()
        total = all_reduce_sum(total).cpu()
        if total[1] == 0:
            return {}
        val = float(total[0] / total[1])
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

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
    def run(self) -> int:
        c = self.cfg
        if c.trainer.resume not in (None, "auto"):
            self._resume_target()  # a wrong checkpoint path fails before any expensive work
        self._build_data()
        self._build_model()
        self._print_banner()
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", self.env.rank, c.trainer.keep_last)
        target = broadcast_object(str(self._resume_target()) if self.is_main else None)
        if target not in (None, "None"):
            self._resume(Path(target))
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
        start_time = time.time()
        window_start, window_tokens = time.time(), self.tokens_seen
        bar = None
        if self.is_main and c.logging.progress:
            from tqdm import tqdm

            bar = tqdm(total=c.trainer.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.engine.train()
        stopped_early = False
        while self.step < stop_step:
            record = self._train_step()
            self.step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            last = self.step == stop_step
            if c.trainer.stop_after_minutes is not None:
                over = (time.time() - start_time) / 60 >= c.trainer.stop_after_minutes
                stopped_early = bool(broadcast_object(over)) and not last
                last = last or stopped_early
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
                if do_eval:
                    record.update(self.evaluate())
                window_start, window_tokens = time.time(), self.tokens_seen  # eval/logging time excluded
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}")
                self.metrics.write(record)
                self.wandb.log(record, step=self.step)
                if c.logging.heatmap_every and self.step % c.logging.heatmap_every == 0:
                    self._heatmap(step=self.step)
            if (c.trainer.checkpoint_every and self.step % c.trainer.checkpoint_every == 0) or last:
                self._save()
                window_start = time.time()  # checkpoint time is not training throughput
            if stopped_early:
                break
        if bar is not None:
            bar.close()
        if self.is_main:
            self._heatmap(path=self.run_dir / "routing_heatmap.png", step=self.step)
        if self.step >= c.trainer.max_steps and not stopped_early:
            self._sample()
        self.metrics.close()
        self.wandb.finish()
        barrier()
        return 0

    def _sample(self) -> None:
        """A short generation at the end, so a newcomer sees what the model learned."""
        if not self.is_main or not self.cfg.trainer.sample_tokens:
            return
        if self.ep.enabled:  # experts are spread over ranks: generation would need every rank
            self._log(
                f"sample: skipped under expert parallelism; run python -m moetrain.generate {self.run_dir}"
            )
            return
        from moetrain.generate import encode_prompt, generate_tokens

        tok = self.data.tokenizer
        ids = torch.tensor([encode_prompt(tok, self.cfg.trainer.sample_prompt)], device=self.env.device)
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.trainer.seed)
        out = generate_tokens(
            self.model, ids, self.cfg.trainer.sample_tokens, temperature=0.8, top_p=0.95, generator=gen
        )
        text = tok.decode(out[0].tolist(), skip_special_tokens=True)
        print(f"sample: {text!r}", flush=True)
        (self.run_dir / "sample.txt").write_text(text + "\n")
