"""Process groups, launch environment and collectives. The model never imports this package;
``parallelize`` applies expert parallelism to a built model from the outside (torchtitan-style)."""

from moetrain.distributed.comm import (
    all_gather_object,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    comm_device,
    gather_to_first,
)
from moetrain.distributed.env import (
    DistEnv,
    LaunchError,
    discover_launch_env,
    init_distributed,
    shutdown_distributed,
    strip_launcher_args,
)

__all__ = [
    "all_gather_object",
    "DistEnv",
    "LaunchError",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "comm_device",
    "discover_launch_env",
    "gather_to_first",
    "init_distributed",
    "shutdown_distributed",
    "strip_launcher_args",
]
