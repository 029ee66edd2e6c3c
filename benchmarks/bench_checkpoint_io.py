"""Checkpoint I/O per rank: bytes written, bytes read on an explicit resume, memory, async blocking.

    python benchmarks/bench_checkpoint_io.py [--out DIR]

Runs mixtral_small with 16 experts of F 2048 (an expert-heavy ~1.3 GB checkpoint) three times,
with ``MOETRAIN_CHECKPOINT_STATS=1`` (each rank records /proc/self/io and its memory per save and
per resume, moetrain/checkpoint/checkpointer.py):
1. 2 ranks, ep=2, 3 steps, a checkpoint each step (steps 1-2 asynchronous, step 3 the run's last,
   synchronous);
2. 2 ranks, ep=2, resuming from run 1's step-3 checkpoint by explicit path (nothing to train);
3. 1 rank, the same 3 steps (rank 0's memory at one rank).
The data caches are built before the first run, so all three start warm.
Prints one JSON object (and writes it to OUT/checkpoint_io.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from moetrain.config import DataConfig
from moetrain.data import build_data
from moetrain.testing import check_ok, run_train

MODEL = (
    "+experiment=mixtral_small",
    "model.num_experts=16",
    "model.ffn_hidden_size=2048",
    "data.seq_len=128",
    "optim.micro_batch_size=1",
    "trainer.eval_every=0",
    "trainer.log_every=1",
    "trainer.sample_tokens=0",
    "logging.progress=false",
    "logging.wandb.mode=disabled",
    "trainer.keep_last=3",
)
ENV = {"MOETRAIN_CHECKPOINT_STATS": "1"}


def _stats(run: Path, name: str, rank: int) -> list[dict]:
    path = run / f"{name}_rank_{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ckpt_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ckpt-io-"))
    # Build the data caches first (corpus, tokenizer, packed blocks), so every measured run starts
    # warm, as all runs of a config but its very first do: the cold build imports `datasets` into rank 0.
    build_data(DataConfig(seq_len=128))
    steps = ("trainer.max_steps=3", "trainer.checkpoint_every=1")
    two = out / "ep2"
    check_ok(run_train(two, *MODEL, *steps, "parallel.ep_size=2", nproc=2, env=ENV, timeout=3000))
    ckpt = two / "checkpoints" / "step_00000003"
    size = _ckpt_bytes(ckpt)
    resumed = out / "ep2-resume"
    check_ok(
        run_train(
            resumed,
            *MODEL,
            *steps,
            "parallel.ep_size=2",
            f"trainer.resume={ckpt}",
            nproc=2,
            env=ENV,
            timeout=3000,
        )
    )
    one = out / "one"
    check_ok(run_train(one, *MODEL, *steps, nproc=1, env=ENV, timeout=3000))
    saves = {r: _stats(two, "checkpoint_stats", r) for r in (0, 1)}
    reads = {r: _stats(resumed, "resume_stats", r)[0] for r in (0, 1)}
    single = _stats(one, "checkpoint_stats", 0)
    blocked = [s["blocked_s"] for s in saves[0] if s["async"]]
    sync = [s["total_s"] for s in saves[0] if not s["async"]]
    result = {
        "checkpoint_bytes": size,
        "write_bytes_per_rank": {r: saves[r][-1]["write_bytes"] for r in (0, 1)},
        "write_fraction_per_rank": {r: saves[r][-1]["write_bytes"] / size for r in (0, 1)},
        "resume_rchar_per_rank": {r: reads[r]["rchar"] for r in (0, 1)},
        "resume_read_fraction_per_rank": {r: reads[r]["rchar"] / size for r in (0, 1)},
        "rank0_peak_kib_2_ranks": max(s["VmHWM"] for s in saves[0]),
        "rank0_peak_kib_1_rank": max(s["VmHWM"] for s in single),
        "async_blocked_s": blocked,
        "sync_save_s": sync,
        "async_blocked_over_sync": statistics.median(blocked) / statistics.median(sync),
        "saves_rank0": saves[0],
        "saves_single": single,
    }
    result["rank0_peak_ratio"] = result["rank0_peak_kib_2_ranks"] / result["rank0_peak_kib_1_rank"]
    (out / "checkpoint_io.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("saves")}, indent=1))


if __name__ == "__main__":
    main()
