"""``moetrain.train`` with a deliberate expert-parallel bug: the negative controls' training entry.

The equivalence tests (tests/distributed/test_expert_parallel.py) compare an ep 2 run with a one-process
run under tolerances that ignore rounding order. A tolerance that also ignored a real bug would be
useless, so the negative controls train with one of these bugs and assert that the same comparison
reports the difference. ``MOETRAIN_TEST_BUG`` picks the bug; the trainer is otherwise untouched:

- ``wrong-expert-group``: each expert gradient is averaged over the expert-*parallel* group, i.e.
  with the gradient of a *different* expert on the other rank (what happens when expert params are
  reduced like dense ones; see docs/ARCHITECTURE.md, "Expert parallelism");
- ``expert-grad-over-ep``: each expert gradient is scaled by 1/ep_size (MegaBlocks' own scaling
  applied on top of DeepSpeed's, which already yields the global mean);
- ``zero3-untagged-experts`` (with ``parallel.zero_stage=3``): the expert parameters keep DeepSpeed's
  default "replicated" ZeRO-3 placement instead of their expert-data-parallel group, so ZeRO-3
  partitions them over all ranks and averages gradients of different experts (what
  ``moetrain.distributed.zero3.prepare_zero3`` prevents).

Run like ``python -m moetrain.train`` (torchrun passes the same arguments); the moetrain package must be
importable (``moetrain.testing.offline_env`` puts the repository on PYTHONPATH).
"""

from __future__ import annotations

import os
import sys

BUGS = ("wrong-expert-group", "expert-grad-over-ep", "zero3-untagged-experts")


def _install_zero3(bug: str) -> None:
    import moetrain.distributed.zero3 as zero3

    prepare = zero3.prepare_zero3

    def broken_prepare(model, ep):
        assert ep.enabled, "the negative control needs parallel.ep_size > 1"
        prepare(model, ep)
        for layer in model.moe_layers:
            for p in layer.experts.parameters():
                p.ds_zero_placement_family = "replicated"
                del p.ds_zero_partition_group_name
        print(f"negative control: injected bug {bug!r}", flush=True)

    zero3.prepare_zero3 = broken_prepare


def _install(bug: str) -> None:
    if bug.startswith("zero3-"):
        _install_zero3(bug)
        return
    import torch.distributed as dist

    import moetrain.trainer.loop as loop
    from moetrain.distributed.expert_parallel import EXPERT_PARAM_NAMES

    parallelize = loop.parallelize

    def broken_parallelize(model, cfg, env):
        ep = parallelize(model, cfg, env)
        assert ep.enabled, "the negative controls need parallel.ep_size > 1"
        for layer in model.moe_layers:
            for name in EXPERT_PARAM_NAMES:
                p = getattr(layer.experts, name)
                if bug == "expert-grad-over-ep":
                    p.register_hook(lambda g, n=ep.ep_size: g / n)
                else:

                    def mix(g, group=ep.group, n=ep.ep_size):
                        g = g.clone()
                        dist.all_reduce(g, group=group)  # rank r's expert i + rank s's expert i
                        return g / n

                    p.register_hook(mix)
        print(f"negative control: injected bug {bug!r}", flush=True)
        return ep

    loop.parallelize = broken_parallelize


def main() -> None:
    bug = os.environ.get("MOETRAIN_TEST_BUG", "")
    if bug not in BUGS:
        sys.exit(f"error: MOETRAIN_TEST_BUG={bug!r} is not one of {', '.join(BUGS)}")
    from moetrain.distributed.env import strip_launcher_args

    sys.argv = strip_launcher_args(sys.argv)
    _install(bug)
    from moetrain.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
