"""Process groups, launch environment and collectives. The model never imports this package;
``parallelize`` applies expert parallelism to a built model from the outside (torchtitan-style)."""

from moetrain.distributed.env import (
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    strip_launcher_args,
)

__all__ = [
    "DistEnv",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "init_distributed",
    "strip_launcher_args",
]
