"""Whole training step, mixtral_small vs dense_small (same active parameters), in one process.

Both trainers are built exactly as ``python -m moetrain.train`` builds them (data, model, DeepSpeed
engine, update guard, routing accumulator) and their ``_train_step`` calls alternate (MoE, dense,
dense, MoE, MoE, ...), so background load hits both alike. Reports the median step time, tokens/s and
the MoE/dense tokens/s ratio per dtype and ``optim.grad_accum`` (of the medians, and the median of
the rounds' paired ratios, which a load that drifts during the run moves less, with its quartiles),
timing pairs for at least ``--repeats`` rounds and ``--seconds`` (so grad_accum 1 gets dozens of
pairs), then, with ``--split``, one profiled
step of each split into components (``step_split``), and, with ``--memory``, the peak resident
memory of each configuration in a child process of its own.

    python benchmarks/bench_train_step.py --dtypes fp32 --grad-accum 1,8 --seconds 60 --split
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
if "MASTER_PORT" not in os.environ:
    os.environ["MASTER_PORT"] = str(_free_port())
os.environ.setdefault("WANDB_MODE", "disabled")
warnings.filterwarnings("ignore")

EXPERIMENTS = ("mixtral_small", "dense_small")


def compose(experiment: str, dtype: str, grad_accum: int, extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from moetrain import CONFIG_DIR
    from moetrain.config import train_config_from_dict

    overrides = [
        f"+experiment={experiment}",
        f"parallel.dtype={dtype}",
        f"optim.grad_accum={grad_accum}",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        raw = hydra_compose(config_name="train", overrides=overrides)
    return train_config_from_dict(OmegaConf.to_container(raw, resolve=True))


def build_trainer(cfg, run_dir: Path):
    """A Trainer set up as ``Trainer.run`` sets it up, without logging, checkpoints or eval."""
    from moetrain.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    t = Trainer(cfg, run_dir)
    t.build()
    t.engine.train()
    return t


def timed_step(trainer) -> float:
    t0 = time.perf_counter()
    trainer._train_step()
    trainer.step += 1
    return time.perf_counter() - t0


def peak_rss_mib(experiment: str, dtype: str, grad_accum: int, extra: list[str]) -> float:
    """Peak resident memory of one process that builds this trainer and runs 2 steps (its own child,
    so the other configuration's memory is not counted): model, optimizer state, data in memory and
    the steps' activations, not the corpus tokenisation before them."""
    cmd = [sys.executable, __file__, "--memory-child", experiment, "--dtypes", dtype]
    cmd += ["--grad-accum", str(grad_accum), *[f"--override={o}" for o in extra]]
    env = {**os.environ, "MASTER_PORT": str(_free_port())}  # the parent's process group holds its port
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _bf16_usable() -> bool:
    def gflops(dtype: torch.dtype) -> float:
        a = torch.randn(512, 512, dtype=dtype)
        a @ a
        t0 = time.perf_counter()
        a @ a
        return 2 * 512**3 / (time.perf_counter() - t0) / 1e9

    return gflops(torch.bfloat16) >= gflops(torch.float32) / 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dtypes",
        default="auto",
        help="comma list; auto = fp32, plus bf16 where bf16 torch.mm is at least 1/4 as fast as fp32",
    )
    ap.add_argument("--grad-accum", default="1,8", help="comma list of optim.grad_accum values")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per configuration, at least")
    # Single steps on a shared 2-core host move by 10-15%: a few pairs give ratios +-0.05 apart from
    # run to run. Timing pairs for a while instead gives grad_accum 1 dozens of pairs.
    ap.add_argument(
        "--seconds", type=float, default=90.0, help="then more timed steps until this many seconds"
    )
    # bf16 on CPU: oneDNN compiles a kernel per new expert row count in the first steps (row blocks
    # bound the shapes, so they are all cached after a few dozen micro-batches: moe/experts.py)
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps per configuration first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", action="store_true", help="also profile one step of each (step_split)")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS per configuration")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # Trainer sets threads from cpu_count otherwise
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_step_"))

    if args.memory_child:
        cfg = compose(args.memory_child, args.dtypes, int(args.grad_accum), args.override)
        trainer = build_trainer(cfg, tmp / "mem")
        torch.set_num_threads(args.threads)
        # The process peak would be the data build's (tokenising the corpus), the same for both
        # models: reset the high-water mark to the current RSS first (Linux), so it is the steps'.
        reset = _reset_peak_rss()
        for _ in range(2):
            timed_step(trainer)
        print(_peak_rss_mib() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return

    if args.dtypes == "auto":
        args.dtypes = "fp32,bf16" if _bf16_usable() else "fp32"
        if args.dtypes == "fp32":
            print(
                "note: bf16 skipped (bf16 torch.mm < 1/4 of fp32 here: no bf16 instructions); --dtypes fp32,bf16 forces it"
            )
    results = []
    print(
        f"torch {torch.__version__}, {args.threads} threads, median of at least {args.repeats} steps "
        f"and {args.seconds:.0f} s per configuration, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        "| dtype | grad_accum | tokens/step | MoE ms/step | dense ms/step | MoE tok/s | dense tok/s "
        "| MoE/dense tok/s | paired (quartiles) | pairs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        for ga in [int(g) for g in args.grad_accum.split(",")]:
            trainers = {
                name: build_trainer(compose(name, dtype, ga, args.override), tmp / f"{name}_{dtype}_{ga}")
                for name in EXPERIMENTS
            }
            torch.set_num_threads(args.threads)  # Trainer sets cpu_count // local world
            times: dict[str, list[float]] = {name: [] for name in EXPERIMENTS}
            i, timed_since = 0, None
            # at least one timed round, so the clock has started before it is read
            while i < args.warmup + max(args.repeats, 1) or time.perf_counter() - timed_since < args.seconds:
                if i == args.warmup:
                    timed_since = time.perf_counter()
                # interleaved, the order swapped every round: a slow spell on a shared host hits
                # both models alike, and each round gives one paired ratio
                for name in EXPERIMENTS if i % 2 == 0 else EXPERIMENTS[::-1]:
                    s = timed_step(trainers[name])
                    if i >= args.warmup:
                        times[name].append(s)
                i += 1
            cfg = trainers["dense_small"].cfg
            tokens = cfg.optim.micro_batch_size * ga * cfg.data.seq_len
            med = {k: statistics.median(v) for k, v in times.items()}
            tps = {k: tokens / v for k, v in med.items()}
            # per round dense/MoE step time (the same tokens): robust to drifting load
            paired = [d / m for m, d in zip(times["mixtral_small"], times["dense_small"], strict=True)]
            q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
            row = {
                "dtype": dtype,
                "grad_accum": ga,
                "tokens_per_step": tokens,
                "ms_per_step": {k: v * 1e3 for k, v in med.items()},
                "tokens_per_sec": tps,
                "ratio": tps["mixtral_small"] / tps["dense_small"],
                "paired_ratio": statistics.median(paired),
                "paired_quartiles": [q1, q3],
                "pairs": len(paired),
                "load_average": os.getloadavg()[0],
            }
            print(
                f"| {dtype} | {ga} | {tokens} | {med['mixtral_small'] * 1e3:.0f} | {med['dense_small'] * 1e3:.0f} "
                f"| {tps['mixtral_small']:.0f} | {tps['dense_small']:.0f} | {row['ratio']:.3f} "
                f"| {row['paired_ratio']:.3f} ({q1:.2f}-{q3:.2f}) | {len(paired)} |",
                flush=True,
            )
            if args.split:
                from step_split import profile_step_split

                row["split_ms"] = {name: profile_step_split(t) for name, t in trainers.items()}
            if args.memory:
                row["peak_rss_mib"] = {
                    name: peak_rss_mib(name, dtype, ga, args.override) for name in EXPERIMENTS
                }
            results.append(row)
            del trainers
    if args.split:
        from step_split import COMPONENTS

        print("\nstep split (one profiled step each, ms; profiler overhead included):")
        print("| dtype | grad_accum | model | " + " | ".join(COMPONENTS) + " | total |")
        print("|---|---:|---|" + "---:|" * (len(COMPONENTS) + 1))
        for row in results:
            for name, split in row["split_ms"].items():
                cells = " | ".join(f"{split.get(c, 0.0):.0f}" for c in COMPONENTS)
                print(f"| {row['dtype']} | {row['grad_accum']} | {name} | {cells} | {split['total']:.0f} |")
    if args.memory:
        print("\npeak resident memory of one process (MiB):")
        for row in results:
            print(f"- {row['dtype']} grad_accum {row['grad_accum']}: {row['peak_rss_mib']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
