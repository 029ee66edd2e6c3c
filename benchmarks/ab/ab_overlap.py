"""Overlap options at ep=2 on 2 processes, interleaved: mixtral_small as the trainer builds it (DeepSpeed
engine, ZeRO-0, fp32) with one blocking expert all-to-all (``parallel.a2a_chunks=1``) vs the chunked,
overlapped exchange (``a2a_chunks=C``), and gradients all-reduced in fp32 vs bf16
(``parallel.grad_reduce_dtype``).

    torchrun --standalone --nproc_per_node=2 benchmarks/ab/ab_overlap.py --rounds 6 --chunks 2 4

Every variant is its own engine on the same initial weights; a round runs one whole step (forward,
backward with DeepSpeed's gradient all-reduce, AdamW) of each variant on the same batch, in an order
rotated round by round, each step between barriers; a step's time is the slower rank's. Round 0 is
warm-up and checks that every variant's first loss equals the baseline's (the same weights, the same
batch). Rank 0 prints each round's ratio to the baseline and their median.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from moetrain import CONFIG_DIR
    from moetrain.config import train_config_from_dict

    base = [
        "+experiment=mixtral_small",
        "parallel.dtype=fp32",
        "parallel.ep_size=2",
        "logging.wandb.mode=disabled",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        raw = hydra_compose(config_name="train", overrides=base + overrides)
    return train_config_from_dict(OmegaConf.to_container(raw, resolve=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--chunks", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--no-bf16-reduce", action="store_true")
    args = parser.parse_args()

    from moetrain.distributed import init_distributed
    from moetrain.distributed.expert_parallel import parallelize
    from moetrain.model import MoETransformer
    from moetrain.trainer.engine import build_engine

    env = init_distributed()
    variants = {"a2a_chunks=1, fp32 reduce": []}
    variants.update({f"a2a_chunks={c}": [f"parallel.a2a_chunks={c}"] for c in args.chunks})
    if not args.no_bf16_reduce:
        variants["grad_reduce_dtype=bf16"] = ["parallel.grad_reduce_dtype=bf16"]
    engines = {}
    for name, overrides in variants.items():
        cfg = compose(overrides)
        torch.manual_seed(1234)
        model = MoETransformer(cfg.model)
        parallelize(model, cfg, env)
        engines[name] = build_engine(model, cfg, env.world_size)[0]
        engines[name].train()
    mb, seq, vocab = cfg.optim.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    names = list(engines)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds + 1):
        gen = torch.Generator().manual_seed(100 * r + env.rank)
        ids = torch.randint(0, vocab, (mb, seq + 1), generator=gen)
        losses = {}
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            engine = engines[name]
            dist.barrier()
            t0 = time.perf_counter()
            out = engine(ids[:, :-1], ids[:, 1:])
            engine.backward(out.loss)
            engine.step()
            elapsed = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            losses[name] = out.loss.item()
            if r > 0:
                times[name].append(elapsed.item())
        if r == 0:
            base = losses[names[0]]
            for name, loss in losses.items():
                assert abs(loss - base) <= 1e-5 * abs(base), (name, loss, base)
    if env.rank == 0:
        base = times[names[0]]
        print(f"world {env.world_size}, ep 2, micro-batch {mb} x seq {seq}, {args.rounds} rounds")
        print("| variant | median step s | ratio to baseline per round | median ratio |")
        print("|---|---|---|---|")
        for name in names:
            ratios = [t / b for t, b in zip(times[name], base)]
            per_round = " ".join(f"{x:.3f}" for x in ratios)
            med = statistics.median(times[name])
            print(f"| {name} | {med:.3f} | {per_round} | {statistics.median(ratios):.3f} |")
    dist.barrier()


if __name__ == "__main__":
    main()
