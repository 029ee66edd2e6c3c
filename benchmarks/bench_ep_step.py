"""Expert-parallel step time: mixtral_small at ep_size 1 vs 2 on the same processes, compute vs all-to-all.

Launch with two processes (one per core on a 2-core CPU):

    .venv/bin/torchrun --standalone --nproc_per_node=2 benchmarks/bench_ep_step.py --steps 20 --warmup 3

Two copies of ``moetrain/configs/model/mixtral_small.yaml`` (H=256, 4 layers, 8 experts, top-2, F=512, vocab
8192, seq 256) are built from the same seed on every rank:

- **ep 1**: pure data parallel. Every rank holds all experts; after backward all gradients are
  flattened into one bucket, all-reduced over the world and divided by the world size.
- **ep 2**: ``moetrain.distributed.expert_parallel.parallelize`` with ``parallel.ep_size=2``. Each
  rank holds 4 experts; token copies go to the owning rank by all-to-all (``AllToAllExchange``).
  Dense gradients are all-reduced as above. Expert gradients are only divided by the world size:
  with 2 processes their expert-data-parallel group has size 1, so DeepSpeed's reduction over that
  group is a no-op (``engine._reduce_expert_gradients`` scales by 1 / data-parallel size).

A step is forward + backward + gradient all-reduce + ``torch.optim.AdamW`` step. This is plain torch
that does what the DeepSpeed engine does at ZeRO stage 0 in fp32. There is no DeepSpeed engine,
no gradient clipping and no LR schedule, so the timing does not include engine overhead. The two
layouts alternate step by step (ep1, ep2, ep1, ...), with a barrier before each step, and get the
same batch, so background load affects both alike. Before timing, the script checks that the two
layouts give the same loss and the same reduced gradients on the same batch.

All-to-all time: ``torch.distributed.all_to_all_single`` is replaced by a timer, both on
``torch.distributed`` and in every module that imported it by name. The autograd all-to-all in
``torch.distributed.nn.functional`` calls ``dist.all_to_all_single`` in its forward and backward, so
the timer sees the count exchange, the token exchange, the combine and both backward exchanges.
Bytes = the elements of each input tensor (sum of the input split sizes x H) x 4 bytes, summed over a
step. The grad all-reduce is timed separately (flatten, all_reduce, scale, copy back). Compute = step
time - all-to-all - grad all-reduce. gloo collectives block, so a collective's time also includes
waiting for the slower rank. Rank 0 prints medians over the measured steps, as a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moetrain.config import DataConfig, TrainConfig, model_config_from_dict
from moetrain.distributed.env import init_distributed
from moetrain.distributed.expert_parallel import parallelize
from moetrain.model.transformer import MoETransformer

ROOT = Path(__file__).resolve().parents[1]


class CollectiveTimer:
    """Wall time and bytes of every ``all_to_all_single`` call, accumulated until ``reset``."""

    def __init__(self) -> None:
        self.seconds, self.bytes, self.calls = 0.0, 0, 0

    def reset(self) -> tuple[float, int, int]:
        out = (self.seconds, self.bytes, self.calls)
        self.seconds, self.bytes, self.calls = 0.0, 0, 0
        return out

    def install(self) -> None:
        original = dist.all_to_all_single

        @functools.wraps(original)
        def timed(output, input, *args, **kwargs):
            t0 = time.perf_counter()
            result = original(output, input, *args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.bytes += input.numel() * input.element_size()
            self.calls += 1
            return result

        # Patch torch.distributed and every loaded module that holds the function under that name
        # (e.g. torch.distributed.distributed_c10d); the autograd wrapper in nn.functional is a
        # different function and looks up ``dist.all_to_all_single`` at call time.
        for module in list(sys.modules.values()):
            if module is not None and getattr(module, "all_to_all_single", None) is original:
                module.all_to_all_single = timed


def load_model_config():
    values = yaml.safe_load((ROOT / "moetrain/configs/model/mixtral_small.yaml").read_text())
    values["vocab_size"] = DataConfig().vocab_size  # ${data.vocab_size}, 8192 by default
    return model_config_from_dict(values)


def build(model_cfg, ep_size: int, env, seed: int):
    torch.manual_seed(seed)  # same init on every rank and for both layouts
    model = MoETransformer(model_cfg)
    cfg = TrainConfig(model=model_cfg)
    cfg.parallel.ep_size = ep_size
    cfg.validate()
    info = parallelize(model, cfg, env)
    expert = [p for p in model.parameters() if getattr(p, "allreduce", True) is False]
    expert_ids = {id(p) for p in expert}
    dense = [p for p in model.parameters() if id(p) not in expert_ids]
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
    )
    return model, opt, dense, expert, info


def reduce_grads(dense, expert, world: int) -> None:
    """DeepSpeed stage 0: one flat bucket of dense grads, all-reduced and averaged over the world."""
    grads = [p.grad for p in dense]
    flat = _flatten_dense_tensors(grads)
    flat.mul_(1.0 / world)
    dist.all_reduce(flat)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
    for p in expert:  # expert-DP group of size 1: no communication, only the 1/dp_world scaling
        p.grad.mul_(1.0 / world)


def train_step(model, opt, dense, expert, ids, labels, world: int, a2a: CollectiveTimer) -> dict:
    opt.zero_grad(set_to_none=True)
    dist.barrier()
    a2a.reset()
    t0 = time.perf_counter()
    out = model(ids, labels)
    out.loss.backward()
    t1 = time.perf_counter()
    reduce_grads(dense, expert, world)
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    a2a_s, a2a_bytes, calls = a2a.reset()
    return {
        "step": t3 - t0,
        "a2a": a2a_s,
        "allreduce": t2 - t1,
        "compute": (t3 - t0) - a2a_s - (t2 - t1),
        "bytes": a2a_bytes,
        "calls": calls,
        "loss": out.loss.item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    warnings.filterwarnings("ignore", message=".*all_to_all_single.*")  # nn.functional deprecation notice
    torch.set_num_threads(args.threads)
    env = init_distributed()
    world, rank = env.world_size, env.rank
    if world != 2:
        raise SystemExit(f"run with 2 processes (torchrun --nproc_per_node=2), got {world}")

    model_cfg = load_model_config()
    layouts = {"ep 1 (data parallel)": build(model_cfg, 1, env, args.seed)}
    layouts["ep 2 (experts sharded)"] = build(model_cfg, 2, env, args.seed)
    for model, *_ in layouts.values():
        model.train()
    a2a = CollectiveTimer()
    a2a.install()

    gen = torch.Generator().manual_seed(args.seed + rank)  # each rank reads different tokens
    B, T, V = args.micro_batch, args.seq_len, model_cfg.vocab_size

    # Same parameters and same batch: both layouts compute the same loss and, after the reduction,
    # the same gradients (EP changes where the experts run, not what is computed).
    ids = torch.randint(0, V, (B, T), generator=gen)
    losses = []
    for model, opt, dense, expert, _ in layouts.values():
        opt.zero_grad(set_to_none=True)
        loss = model(ids, ids).loss
        loss.backward()
        reduce_grads(dense, expert, world)
        losses.append(loss.item())
    if abs(losses[0] - losses[1]) > 1e-4 * abs(losses[0]):
        raise SystemExit(f"rank {rank}: ep1 loss {losses[0]:.6f} != ep2 loss {losses[1]:.6f}")
    (m1, *_), (m2, *_, ep2) = layouts.values()
    full = dict(m1.named_parameters())
    for name, p in m2.named_parameters():
        g_ref = full[name].grad
        if g_ref.shape != p.shape:  # expert shard: this rank's slice of the full expert tensor
            g_ref = g_ref[ep2.ep_rank * p.shape[0] : (ep2.ep_rank + 1) * p.shape[0]]
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-4, atol=1e-6 * g_ref.abs().max().item())
    payload = {n: sum(p.numel() * 4 for p in d) for n, (_, _, d, _, _) in layouts.items()}
    params = {n: sum(p.numel() for p in m.parameters()) for n, (m, *_) in layouts.items()}

    results: dict[str, list[dict]] = {name: [] for name in layouts}
    load_before = os.getloadavg()
    for i in range(args.warmup + args.steps):
        seq = torch.randint(0, V, (B, T + 1), generator=gen)
        ids, labels = seq[:, :-1], seq[:, 1:]
        for name, (model, opt, dense, expert, _) in layouts.items():  # ABAB...
            r = train_step(model, opt, dense, expert, ids, labels, world, a2a)
            if i >= args.warmup:
                results[name].append(r)
    load_after = os.getloadavg()

    # Rank 1's medians too: the collectives make both ranks wait for each other, so they should agree.
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    all_med = [None] * world
    dist.all_gather_object(all_med, med)
    final_losses = [rs[-1]["loss"] for rs in results.values()]
    if rank == 0:
        cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
        tokens = world * B * T
        print(
            f"# {cpu.split(':', 1)[-1].strip()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{world} processes x {args.threads} thread(s), gloo"
        )
        print(
            f"# mixtral_small, micro-batch {B} x seq {T} per rank ({tokens} tokens/step in all), "
            f"{args.steps} measured steps after {args.warmup} warm-up, layouts alternating per step"
        )
        print(
            f"# load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
            f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
        )
        print(
            "# parameters per rank: "
            + ", ".join(f"{n.split(' (')[0]} {params[n] / 1e6:.2f} M" for n in layouts)
            + "; grad all-reduce payload per rank: "
            + ", ".join(f"{n.split(' (')[0]} {payload[n] / 1e6:.1f} MB" for n in layouts)
        )
        print(
            f"# same loss and gradients checked before timing; loss after the last step "
            f"(AdamW amplifies rounding differences): ep1 {final_losses[0]:.4f}, ep2 {final_losses[1]:.4f}"
        )
        print(
            "| layout | step ms (median) | compute ms | all-to-all ms (share %) | grad all-reduce ms "
            "| tokens/s | a2a MB/step |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, m in med.items():
            print(
                f"| {name} | {m['step'] * 1e3:.1f} | {m['compute'] * 1e3:.1f} "
                f"| {m['a2a'] * 1e3:.1f} ({100 * m['a2a'] / m['step']:.0f}%) | {m['allreduce'] * 1e3:.1f} "
                f"| {tokens / m['step']:.0f} | {m['bytes'] / 1e6:.2f} |"
            )
        for r, other in enumerate(all_med[1:], start=1):
            steps = ", ".join(f"{n.split(' (')[0]} {m['step'] * 1e3:.1f} ms" for n, m in other.items())
            calls = ", ".join(f"{n.split(' (')[0]} {int(m['calls'])}" for n, m in med.items())
            print(f"# rank {r} median step: {steps}; all_to_all_single calls per step (rank 0): {calls}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
