"""The training loop, readable top to bottom: set-up -> (resume) -> steps -> eval -> checkpoint -> sample.

One optimizer step = ``optim.grad_accum`` micro-batches per rank; DeepSpeed scales the loss and
reduces gradients at the boundary. Everything logged is global (mean or sum over data-parallel ranks).
The loop owns the run's state and calls components for the rest: setup.py (process, data, model,
engine), banner.py, checkpointing.py (moetrain/checkpoint/), reporting.py (lines, metrics, W&B),
guards.py (stop requests, numeric faults), gradients.py, sample.py; DeepSpeed is patched only in
moetrain/distributed/deepspeed_patches.py.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from moetrain.checkpoint.run_lock import RunLock
from moetrain.config import TrainConfig
from moetrain.distributed import DistEnv, all_reduce_mean, all_reduce_sum, any_rank, barrier, init_distributed
from moetrain.distributed.deepspeed_patches import UpdateVeto
from moetrain.trainer import checkpointing
from moetrain.trainer.banner import print_banner
from moetrain.trainer.gradients import clip_grads_, global_grad_norm
from moetrain.trainer.guards import NonFiniteGuard, StopRequest, TrainingDiverged
from moetrain.trainer.pretrained_start import check_pretrained_start
from moetrain.trainer.reporting import Reporter
from moetrain.trainer.sample import end_of_run_sample
from moetrain.trainer.setup import (
    build_data,
    build_model,
    nan_test_steps,
    seed_everything,
    setup_process,
    shared_run_dir,
)


def _documents(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The batch's per-token document ids (data.document_masking), on ``device``; None without."""
    ids = batch.get("document_ids")
    return None if ids is None else ids.to(device, non_blocking=True)


class Trainer:
    """One training run. It owns the run's state (config, process env, run dir, step and token counters;
    after ``build()`` the data, model, engine and scheduler) and calls a component for everything else."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.env: DistEnv = init_distributed(shm_comm=cfg.parallel.shm_comm)
        self.run_dir = shared_run_dir(run_dir)
        setup_process(cfg, self.env.device)
        self.step = 0
        self.tokens_seen = 0
        self.report = Reporter(cfg, self.env, self.run_dir)
        t = cfg.trainer
        self.nonfinite = NonFiniteGuard(t.on_nonfinite, t.max_skipped_steps, t.skip_window)
        self._nan_steps = nan_test_steps()  # tests only: a numeric fault at chosen steps

    def log(self, msg: str) -> None:
        self.report.log(msg)

    def build(self) -> None:
        """The data (it may widen the vocabulary), the model and its DeepSpeed engine, and the loop's
        veto over one optimizer update."""
        self.data, self.train_loader, self.val_loaders = build_data(self.cfg, self.env, self.log)
        built = build_model(self.cfg, self.env, self.run_dir)
        self.model, self.ep, self.lora_base = built.model, built.ep, built.lora_base
        self.dtype, self.engine, self.scheduler = built.dtype, built.engine, built.scheduler
        self.update_veto = UpdateVeto(self.engine.optimizer)

    def run(self) -> int:
        checkpointing.check_run_dir_writable(self.run_dir, self.env.rank)
        self.lock = RunLock(self.run_dir)
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> int:
        c = self.cfg
        self.checkpointer, target, verify_files = checkpointing.open_run_dir(self, self.lock)
        self.build()
        print_banner(c, self.env, self.data, self.model, self.dtype, self.run_dir, self.log)
        if target is not None:
            state = checkpointing.restore_run(self, target, verify_files)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        else:
            seed_everything(c.trainer.seed + self.env.rank)  # per-rank stream for jitter etc.
        config = checkpointing.config_for_checkpoint(self)
        self.report.start(self.step, self.tokens_seen, self.model, self.train_loader, config)
        if target in (None, "None"):  # a pretrained start is evaluated (and checked) before step 1
            check_pretrained_start(self)
        stop_step = c.trainer.stop_at or c.trainer.max_steps
        # resumed at (or past) the stop step: nothing to train, the checkpoint resumed from is the last
        last_saved: Path | None = Path(target) if target is not None and self.step >= stop_step else None
        stopper = StopRequest(c.trainer.stop_signals, c.trainer.stop_after_minutes)
        stopper.install()
        self.engine.train()
        stop_reason = None
        try:
            while self.step < stop_step:
                record = self._train_step()
                self.step += 1
                self.report.advance(record)
                last = self.step == stop_step
                stop_reason = None if last else self._stop_reason(stopper)
                last = last or stop_reason is not None
                do_eval = bool(c.trainer.eval_every) and (self.step % c.trainer.eval_every == 0 or last)
                if (c.trainer.log_every and self.step % c.trainer.log_every == 0) or last or do_eval:
                    evaluate = self.evaluate if do_eval else None
                    self.report.log_step(self.step, self.tokens_seen, record, evaluate)
                if (c.trainer.checkpoint_every and self.step % c.trainer.checkpoint_every == 0) or last:
                    # the last save is synchronous; others stage and write in the background
                    last_saved = (
                        checkpointing.save(self, final=last) or self.checkpointer.last_saved or last_saved
                    )
                    self.report.restart_clock()  # checkpoint time is not training throughput
                if stop_reason is not None:
                    break
        except TrainingDiverged:
            # The faulty update was not applied: the weights are those of the last good step.
            self.report.close_bar()
            if checkpointing.save(self, final=True) is not None:
                self.log(f"checkpoint of step {self.step} (weights before the faulty update) saved")
            self.report.close()
            raise
        finally:
            stopper.uninstall()
        self.checkpointer.close()  # nothing in flight past this point
        last_saved = self.checkpointer.last_saved or last_saved
        if self.report.end_of_run(self.step, stop_reason, last_saved):
            end_of_run_sample(c, self.env, self.ep, self.model, self.data.tokenizer, self.run_dir, self.log)
        self.report.close()
        barrier()
        if last_saved is None:
            self.log("error: the final checkpoint could not be written (see above); older ones are kept")
            return 1
        return 0

    def _stop_reason(self, stopper: StopRequest) -> str | None:
        """Collective (all ranks agree): a stop request, or a source read to its end."""
        reason = stopper.poll()
        if reason is None and self.cfg.data.on_exhausted == "stop":
            # the loader's state is global, so every rank reaches the same answer
            exhausted = self.train_loader.exhausted_within(self.cfg.optim.grad_accum)
            if exhausted is not None:
                reason = f"{exhausted} is read to its end (data.on_exhausted=stop)"
        return reason

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
                grad_norm = (
                    global_grad_norm(self.model, self.ep) if self.cfg.parallel.zero_stage == 0 else None
                )
                bad_loss = not bool(torch.isfinite(sums).all())
                bad_norm = grad_norm is not None and not math.isfinite(grad_norm)
                if any_rank(bad_loss or bad_norm):
                    fault = "non-finite loss" if bad_loss else f"non-finite gradient norm ({grad_norm})"
                elif grad_norm is not None:
                    clip_grads_(self.model, grad_norm, self.cfg.optim.grad_clip)
            self.update_veto.skip = fault is not None
            self.engine.step()
            if boundary:
                skipped = fault is not None or not getattr(self.engine, "_step_applied", True)
                if skipped:
                    # DeepSpeed does not advance the schedule on a skipped update; we do, so the
                    # LR keeps following trainer.step (and a resume at another layout replays it).
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        self.scheduler.step()
                    self.log(self.nonfinite.on_fault(self.step + 1, fault or "non-finite gradients"))
                else:
                    self._after_optimizer_step()
            self.report.routing.add(out.router_stats)
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
