"""Stand-in training entry for the launcher tests: joins the process group, all-reduces, reports.

Started by scripts/two_node_localhost.sh (SCRIPT=tests/_dist_probe.py) under torchrun or the DeepSpeed
launcher; reads RANK/WORLD_SIZE/MASTER_* from the environment and ignores the `--local_rank=N` the
DeepSpeed launcher appends. Prints one line per rank:
    PROBE rank=R world_size=W local_rank=L sum=S args=[...] [NAME=value for each --print-env NAME]
where S is the all-reduced sum of (rank + 1), i.e. W*(W+1)/2 when every rank took part.
"""

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    parser.add_argument("--fail-rank", type=int, default=None, help="this rank exits with status 3")
    parser.add_argument("--print-env", action="append", default=[], help="also report this variable")
    known, rest = parser.parse_known_args()

    rank = int(os.environ["RANK"])
    if known.fail_rank is not None and known.fail_rank == rank:
        print(f"PROBE rank={rank} failing on purpose", flush=True)
        return 3

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    world = dist.get_world_size()
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    local_rank = os.environ.get("LOCAL_RANK", known.local_rank)
    print(
        f"PROBE rank={dist.get_rank()} world_size={world} local_rank={local_rank} sum={int(t.item())} args={rest}"
        + "".join(f" {name}={os.environ.get(name, '<unset>')}" for name in known.print_env),
        flush=True,
    )
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
