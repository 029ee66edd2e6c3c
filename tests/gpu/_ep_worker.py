"""Worker for test_megablocks_ep.py: ``torchrun --standalone --nproc_per_node 2 tests/gpu/_ep_worker.py DTYPE``.

Each rank holds half of the experts (sharded exactly as moetrain.distributed.expert_parallel does) and
runs the megablocks backend through our AllToAllExchange on its own batch. The reference is the full
torch-backend layer run on both ranks' batches. Prints one line ``RESULT {json}`` per rank.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import MoEConfig
from moetrain.distributed.expert_parallel import EXPERT_PARAM_NAMES, AllToAllExchange
from moetrain.moe import MoELayer

H, F, E, K = 256, 512, 8, 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> int:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[1]]
    torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    El = E // world

    torch.manual_seed(0)  # identical full init on every rank
    ref = MoELayer(H, F, E, K, MoEConfig(backend="torch"))
    with torch.no_grad():
        ref.router.gate.weight.normal_(0.0, 0.05)
        for name in EXPERT_PARAM_NAMES:
            getattr(ref.experts, name).normal_(0.0, 0.02)
    ep = MoELayer(H, F, E, K, MoEConfig(backend="megablocks"))
    ep.load_state_dict(ref.state_dict(), strict=True)
    ref, ep = ref.to("cuda", dtype), ep.to("cuda", dtype)
    with torch.no_grad():  # the shard of the full init, as parallelize() does
        for name in EXPERT_PARAM_NAMES:
            full = getattr(ep.experts, name)
            setattr(ep.experts, name, nn.Parameter(full.data[rank * El : (rank + 1) * El].clone()))
    ep.experts.num_experts = El
    ep.exchange = AllToAllExchange(dist.group.WORLD, world, El)

    torch.manual_seed(100 + rank)
    x = torch.randn(2, 96, H, device="cuda", dtype=dtype)
    g = torch.randn(2, 96, H, device="cuda")
    xs = [torch.empty_like(x) for _ in range(world)]
    gs = [torch.empty_like(g) for _ in range(world)]
    dist.all_gather(xs, x)
    dist.all_gather(gs, g)

    # expert parallel: local batch, local loss
    out_ep, _ = ep(x)
    (out_ep.float() * g).sum().backward()
    gate_grad = ep.router.gate.weight.grad.clone()
    dist.all_reduce(gate_grad)  # the data-parallel sum of the replicated router's gradient

    # reference: the full layer on every rank's batch, the sum of the per-rank losses
    outs = [ref(xr)[0] for xr in xs]
    sum((o.float() * gr).sum() for o, gr in zip(outs, gs)).backward()

    result = {
        "rank": rank,
        "out": rel(out_ep, outs[rank]),
        "gate": rel(gate_grad, ref.router.gate.weight.grad),
    }
    for name in EXPERT_PARAM_NAMES:  # no 1/ep scaling: the shard's grad is the full grad of its experts
        full_grad = getattr(ref.experts, name).grad[rank * El : (rank + 1) * El]
        result[name] = rel(getattr(ep.experts, name).grad, full_grad)
    print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
