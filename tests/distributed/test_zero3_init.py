"""ZeRO-3 builds the model partitioned (``distributed.zero3.build_partitioned``): never whole on a rank.

On 2 gloo ranks, each parameter gathered from its partitions equals, bit for bit, what the whole
(ZeRO-0) build holds on that rank for the same seed, random init (a tied head: still one Parameter)
``model.init_from`` and ``model.upcycle_from`` alike; the
experts are partitioned over their expert-data-parallel group (ep 2: one rank, not split), the rest
over both ranks. Negative control: the same comparison against a build with another seed (and
no weights loaded) fails.
The training-level checks (same loss curve as one process at ZeRO-0, resume) are in test_zero3.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetrain.testing import run_distributed, tiny_hf_model

pytestmark = [pytest.mark.multiprocess]


def _config(ep_size: int, folder: str | None, upcycle: bool):
    from moetrain.config import TrainConfig
    from moetrain.pretrained import resolve_pretrained
    from moetrain.testing import tiny_model_config

    cfg = TrainConfig()
    cfg.data.vocab_size, cfg.data.seq_len = 512, 64
    cfg.parallel.ep_size, cfg.parallel.zero_stage, cfg.parallel.dtype = ep_size, 3, "fp32"
    if upcycle:  # a dense model's FFN copied into every expert, plus per-expert noise
        cfg.model.upcycle_from, cfg.model.num_experts, cfg.model.top_k = folder, 4, 2
        cfg.model.upcycle_noise = 0.1
        resolve_pretrained(cfg, [])
    elif folder:
        cfg.model.init_from = folder
        resolve_pretrained(cfg, [])
    else:
        cfg.model = tiny_model_config(vocab_size=512, tie_embeddings=True)
    return cfg


def _compare(env, ep_size: int, folder: str | None, upcycle: bool = False) -> None:  # noqa: ANN001
    import deepspeed
    import torch.distributed as dist

    from moetrain.distributed.expert_parallel import build_model
    from moetrain.distributed.zero3 import build_partitioned, cast_partitions, is_partitioned
    from moetrain.pretrained import load_pretrained
    from moetrain.trainer.engine import deepspeed_config

    cfg = _config(ep_size, folder, upcycle)
    kw = {"upcycle": True, "noise": cfg.model.upcycle_noise} if upcycle else {}
    rank, world = env.rank, env.world_size
    ep_rank = rank % ep_size

    def whole(seed: int, load: bool) -> dict[str, torch.Tensor]:  # the ZeRO-0 build of this rank
        torch.manual_seed(seed)
        ref = build_model(cfg, torch.device("cpu"), ep_rank, ep_size)
        if load:
            load_pretrained(ref, folder, **kw)
        return {**dict(ref.named_parameters()), **dict(ref.named_buffers())}

    ref, other = whole(0, bool(folder)), whole(1, False)
    torch.manual_seed(0)
    model, ep = build_partitioned(cfg, env, deepspeed_config(cfg, world))
    if folder:
        load_pretrained(model, folder, **kw)
    cast_partitions(model, torch.float32)
    differs = []
    for name, p in model.named_parameters():
        assert is_partitioned(p), name
        expert = ".experts." in name
        group = world // ep_size if expert else world
        assert dist.get_world_size(p.ds_process_group) == group, (name, group)
        assert p.ds_tensor.numel() == -(-p.ds_numel // group), name  # this rank's part only
        with deepspeed.zero.GatheredParameters([p]):
            assert torch.equal(p.data, ref[name]), f"rank {rank}: {name} differs from the ZeRO-0 build"
            differs.append(not torch.equal(p.data, other[name]))
    for name, b in model.named_buffers():
        assert torch.equal(b, ref[name]), name
    assert any(differs), "negative control: another build must differ"
    if folder is None:  # the random-init model ties its head to the embedding: one Parameter still
        assert model.lm_head.weight is model.embed.weight


def _worker(rank: int, world: int, folder: str, dense: str) -> None:
    from moetrain.distributed import init_distributed

    env = init_distributed()
    _compare(env, 1, None)  # random init, everything over both ranks
    _compare(env, 2, folder)  # init_from, experts over their group of one rank
    _compare(env, 1, dense, upcycle=True)  # upcycled experts (noise per global expert) split over ranks


def test_zero3_partitioned_build_equals_the_whole_build(tmp_path: Path) -> None:
    folder = tmp_path / "mixtral"
    tiny_hf_model("mixtral", folder)
    tiny_hf_model("qwen3", tmp_path / "dense")
    run_distributed(_worker, 2, str(folder), str(tmp_path / "dense"), timeout=240)
