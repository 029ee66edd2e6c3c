"""What a run reports while it trains; the loop calls it, it never drives the loop: console and
train.log lines, the progress bar, throughput and MFU, routing records and collapse alerts, the
routing heatmap, metrics.jsonl and W&B (moetrain/tracking/ has the pieces, this assembles them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig
from moetrain.distributed import DistEnv, all_reduce_sum
from moetrain.tracking import CollapseDetector, MetricsFile, RoutingAccumulator, WandbRun, routing_metrics

# Dense bf16 peak TFLOP/s for MFU on known accelerators; unknown devices (and CPUs) log TFLOP/s only.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def step_line(step: int, max_steps: int, record: dict[str, Any]) -> str:
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


def run_log() -> logging.Logger:
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


class Reporter:
    """Rank 0 writes; every rank calls the collective parts (routing records) at the same steps."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, run_dir: Path) -> None:
        self.cfg, self.env, self.run_dir, self.is_main = cfg, env, run_dir, env.is_main
        self.bar: Any = None
        # the train step adds each forward's RouterStats; a logged step reduces and resets them
        self.routing = RoutingAccumulator(cfg.model.moe_layer_ids, cfg.model.num_experts, env.device)
        self.collapse = CollapseDetector(cfg.logging.collapse_threshold, cfg.logging.collapse_window)
        self.last_counts: torch.Tensor | None = None

    def log(self, msg: str) -> None:
        if self.is_main:
            if self.bar is not None:  # a line of its own, not glued onto the progress bar
                self.bar.write(msg)
            else:
                print(msg, flush=True)
            run_log().info(msg)

    def start(self, step: int, tokens_seen: int, model: Any, loader: Any, config: dict[str, Any]) -> None:
        """Once the run's state is known (after a resume): metrics.jsonl (cut after ``step``), W&B,
        the throughput window and the progress bar."""
        from moetrain.plan import flops_per_token

        c = self.cfg
        self.model, self.loader, self.epochs_logged = model, loader, loader.epochs()
        self.metrics = MetricsFile(
            self.run_dir / "metrics.jsonl", enabled=self.is_main, resume_step=step if step else None
        )
        self.wandb = WandbRun(c.logging.wandb, self.run_dir, config, enabled=self.is_main)
        self.flops_per_token = flops_per_token(c.model, c.data.seq_len)["training"]
        self.peak = peak_tflops(self.env.device)
        self.window_start, self.window_tokens = time.time(), tokens_seen
        if self.is_main and c.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=c.trainer.max_steps, initial=step, desc="train", dynamic_ncols=True)

    def write(self, record: dict[str, Any], step: int) -> None:
        self.metrics.write(record)
        self.wandb.log(record, step=step)

    def advance(self, record: dict[str, Any]) -> None:
        """Every step: the progress bar moves (the step's record is logged only on log steps)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)

    def restart_clock(self) -> None:
        """Time spent saving a checkpoint is not training throughput."""
        self.window_start = time.time()

    def log_step(
        self, step: int, tokens_seen: int, record: dict[str, Any], evaluate: Callable[[], dict] | None
    ) -> None:
        """Collective (routing counts; ``evaluate`` when given): one logged step's record, completed
        with throughput, MFU, routing, data and validation, then printed and written."""
        now = time.time()
        tps = (tokens_seen - self.window_tokens) / max(now - self.window_start, 1e-9)
        record.update(step=step, tokens=tokens_seen, tokens_per_sec=tps)
        if self.flops_per_token:
            record["tflops"] = tps * self.flops_per_token / 1e12
            if self.peak:
                record["mfu"] = record["tflops"] / (self.peak * self.env.world_size)
        record.update(self._routing_record())
        record.update(self._data_record())
        if evaluate is not None:
            record.update(evaluate())
        self.window_start, self.window_tokens = time.time(), tokens_seen  # eval/logging excluded
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}")
        self._print_step(step, record)
        self.write(record, step)
        if self.cfg.logging.heatmap_every and step % self.cfg.logging.heatmap_every == 0:
            self.heatmap(step)

    def _print_step(self, step: int, record: dict[str, Any]) -> None:
        """One plain line per log step (what a cluster log shows), unless the progress bar shows it."""
        if not self.is_main:
            return
        line = step_line(step, self.cfg.trainer.max_steps, record)
        if self.cfg.logging.progress:
            run_log().info(line)
            if "val_loss" in record:
                self.log(f"step {step}: val_loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})")
            return
        self.log(line)

    def _routing_record(self) -> dict[str, Any]:
        if not self.model.moe_layers:
            return {}
        flat = all_reduce_sum(self.routing.packed()).cpu()
        counts, entropy, dropped, forwards = self.routing.unpack(flat)
        forwards = forwards / self.env.world_size
        self.routing.reset()
        layer_ids = self.cfg.model.moe_layer_ids
        metrics = routing_metrics(layer_ids, counts, entropy / self.env.world_size, dropped, forwards)
        self.last_counts = counts
        fractions = {
            layer: metrics[f"moe/layer_{layer}/expert_fraction"]
            for layer in layer_ids
            if f"moe/layer_{layer}/expert_fraction" in metrics
        }
        for msg in self.collapse.update(fractions):
            self.log(f"warning: {msg}")
            self.wandb.alert("routing collapse", msg)
        metrics.update(getattr(self.model, "routing_state_metrics", dict)())  # e.g. the expert bias
        return metrics

    def _data_record(self) -> dict[str, Any]:
        """Mixtures: cumulative training tokens and completed epochs per source (global: the
        loader's state is the same on every rank); a line when a source starts another epoch."""
        loader = self.loader
        if not hasattr(loader, "tokens_by_domain"):
            return {}
        epochs = loader.epochs()
        for domain, epoch in epochs.items():
            if epoch > self.epochs_logged.get(domain, 0):
                self.log(
                    f"data: source {domain!r} read to its end, epoch {epoch + 1} begins (data.on_exhausted=repeat)"
                )
        self.epochs_logged = epochs
        record: dict[str, Any] = {f"data/tokens/{d}": n for d, n in loader.tokens_by_domain().items()}
        record.update({f"data/epochs/{d}": e for d, e in epochs.items()})
        return record

    def heatmap(self, step: int, path: Path | None = None) -> None:
        """Tokens per expert at the last logged step: to W&B, and to ``path`` when given."""
        if self.last_counts is None or not self.is_main:
            return
        from moetrain.tracking.plots import expert_heatmap

        fig = expert_heatmap(
            self.last_counts, self.cfg.model.moe_layer_ids, title=f"tokens per expert, step {step}"
        )
        self.wandb.log_image("moe/heatmap", fig, step=step)
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt  # after plots.py chose its backend

        plt.close(fig)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def end_of_run(self, step: int, stop_reason: str | None, last_saved: Path | None) -> bool:
        """The bar closed, the final heatmap saved and, for a run that stopped early, the line saying
        where and how to continue. True when the run trained to ``trainer.max_steps``."""
        self.close_bar()
        self.heatmap(step, path=self.run_dir / "routing_heatmap.png")
        max_steps = self.cfg.trainer.max_steps
        where = f"checkpoint {last_saved}" if last_saved else "no checkpoint could be written"
        if stop_reason is not None:
            self.log(
                f"stopped at step {step} of {max_steps}: {stop_reason}; {where}; "
                "continue with trainer.resume=auto (same hydra.run.dir)"
            )
        elif step < max_steps:
            self.log(
                f"stopped at step {step} of {max_steps} (trainer.stop_at; the LR schedule "
                f"runs to {max_steps}); {where}; continue with trainer.resume=auto"
            )
        else:
            return True
        return False

    def close(self) -> None:
        self.metrics.close()
        self.wandb.finish()
