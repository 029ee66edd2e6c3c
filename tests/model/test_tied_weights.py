"""Tied parameters (``MoETransformer.tied_weights``): the invariant over the declaration.

Whatever makes or replaces parameters (plain build, meta-device build and ``to_empty``, an
expert-parallel shard, a dtype cast, the checkpoint file and its loaders, DeepSpeed at every ZeRO
stage, optimizer steps) leaves every declared alias the *same Parameter object* as its source: one
tensor in ``named_parameters()``, the optimizer and the files; untied models stay untied.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moetrain.checkpoint.legacy_format import load_model_file_shard
from moetrain.checkpoint.model_file import MODEL_FILE, load_model, save_model_file
from moetrain.distributed.expert_parallel import ExpertParallelInfo, build_model
from moetrain.model import MoETransformer
from moetrain.model.transformer import declared_ties, tied_aliases
from moetrain.plan import count_params
from moetrain.testing import run_distributed, tiny_model_config


def assert_tied(model: torch.nn.Module, cfg) -> None:  # noqa: ANN001
    """Every alias is its source (one object), named once; the parameter count is plan's."""
    tied = tied_aliases(model)
    assert tied == declared_ties(cfg)
    assert bool(tied) == cfg.tie_embeddings
    names = dict(model.named_parameters())
    for alias, source in tied.items():
        assert model.get_parameter(alias) is model.get_parameter(source), alias
        assert alias not in names and source in names
    if not cfg.tie_embeddings:
        assert model.lm_head.weight is not model.embed.weight
    held = sum(p.numel() for p in model.parameters())  # parameters() yields a shared one once
    assert held == count_params(cfg)["total"] == model.num_params()


@pytest.mark.parametrize("tie", [True, False])
def test_every_build_keeps_the_declared_ties(tie: bool, tmp_path: Path) -> None:
    cfg = tiny_model_config(tie_embeddings=tie)
    torch.manual_seed(0)
    plain = MoETransformer(cfg)
    assert_tied(plain, cfg)
    torch.manual_seed(0)
    meta = build_model(SimpleNamespace(model=cfg), torch.device("cpu"))  # meta device + to_empty
    assert_tied(meta, cfg)
    for n, p in plain.state_dict().items():
        assert torch.equal(meta.state_dict()[n], p), n  # the same init, slice for slice
    shard = build_model(SimpleNamespace(model=cfg), torch.device("cpu"), 1, 2)  # expert-parallel rank 1 of 2
    assert (
        shard.lm_head.weight is shard.embed.weight if tie else shard.lm_head.weight is not shard.embed.weight
    )
    assert_tied(meta.to(torch.bfloat16).float(), cfg)

    # the file stores a tied matrix once; both loaders re-tie it
    with torch.no_grad():
        meta.embed.weight.add_(1.0)  # trained: differs from any fresh init
    save_model_file(meta.state_dict(), tmp_path, {"model": dataclasses.asdict(cfg)})
    from safetensors import safe_open

    with safe_open(str(tmp_path / MODEL_FILE), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not tie) and "embed.weight" in keys
    loaded = load_model(tmp_path, load_tokenizer=False).model
    assert_tied(loaded, cfg)
    assert torch.equal(loaded.lm_head.weight, meta.lm_head.weight)
    fresh = build_model(SimpleNamespace(model=cfg), torch.device("cpu"))
    load_model_file_shard(fresh, tmp_path / MODEL_FILE, ExpertParallelInfo(enabled=False))
    assert_tied(fresh, cfg)
    assert torch.equal(fresh.lm_head.weight, meta.lm_head.weight)


def test_a_file_written_with_the_tie_lost_loads_untied_with_a_warning(tmp_path: Path) -> None:
    """Checkpoints of tied models trained before the fix hold their own (trained) head: generation and
    analysis load them as trained (untied), resuming them tied is refused in one line."""
    cfg = tiny_model_config(tie_embeddings=True)
    torch.manual_seed(0)
    untied = MoETransformer(tiny_model_config(tie_embeddings=False))
    save_model_file(untied.state_dict(), tmp_path, {"model": dataclasses.asdict(cfg)})
    with pytest.warns(UserWarning, match="loaded untied, as it was trained"):
        loaded = load_model(tmp_path, load_tokenizer=False).model
    assert torch.equal(loaded.lm_head.weight, untied.lm_head.weight)
    from moetrain.checkpoint.model_file import CheckpointError

    with pytest.raises(CheckpointError, match="differs from embed.weight though the model ties them"):
        load_model_file_shard(
            build_model(SimpleNamespace(model=cfg), torch.device("cpu")),
            tmp_path / MODEL_FILE,
            ExpertParallelInfo(enabled=False),
        )


def test_tied_gradient_is_the_sum_of_both_uses() -> None:
    torch.manual_seed(0)
    tied = MoETransformer(tiny_model_config(tie_embeddings=True))
    twin = MoETransformer(tiny_model_config(tie_embeddings=False))
    state = tied.state_dict()
    twin.load_state_dict(state)  # the head holds the embedding's values, as its own tensor
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    for m in (tied, twin):
        m(ids[:, :-1], ids[:, 1:]).loss.backward()
    want = twin.embed.weight.grad + twin.lm_head.weight.grad
    torch.testing.assert_close(tied.embed.weight.grad, want, rtol=1e-5, atol=1e-7)
    assert (twin.lm_head.weight.grad - want).abs().max() > 1e-4  # negative control: one use only


def _engine_worker(rank: int, world: int) -> None:
    from moetrain.checkpoint.layout import stored_tensors
    from moetrain.checkpoint.optimizer_state import OptimizerView
    from moetrain.config import DataConfig, OptimConfig, ParallelConfig, TrainConfig
    from moetrain.distributed import init_distributed
    from moetrain.distributed.expert_parallel import parallelize
    from moetrain.trainer.engine import build_engine

    env = init_distributed()
    for zero, dtype in ((0, "fp32"), (1, "bf16"), (2, "fp32")):
        cfg = TrainConfig(
            model=tiny_model_config(tie_embeddings=True, max_seq_len=16),
            data=DataConfig(seq_len=12),
            optim=OptimConfig(micro_batch_size=2, warmup_steps=0, lr=1e-2),
            parallel=ParallelConfig(ep_size=world, dtype=dtype, zero_stage=zero),
        ).validate()
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"), rank, world)
        model.activation_checkpointing = zero == 2  # the head and embedding stay outside the blocks
        parallelize(model, cfg, env)
        engine, *_ = build_engine(model, cfg, world)
        module = engine.module
        before = module.embed.weight.detach().float().clone()
        gen = torch.Generator().manual_seed(rank)
        for _ in range(3):
            ids = torch.randint(0, cfg.model.vocab_size, (2, 13), generator=gen)
            out = engine(ids[:, :-1], ids[:, 1:])
            engine.backward(out.loss)
            engine.step()
        where = f"ZeRO-{zero} {dtype}"
        assert module.lm_head.weight is module.embed.weight, where
        assert not torch.equal(module.embed.weight.float(), before), where  # it trained
        in_optimizer = [p for g in engine.optimizer.param_groups for p in g["params"]]
        assert sum(p.numel() for p in in_optimizer) <= sum(p.numel() for p in module.parameters()), where
        view = OptimizerView(module, engine.optimizer)
        stored = stored_tensors(module)  # what a checkpoint writes (raises on a lost tie)
        names = [n for n, _, _ in stored]
        assert "embed.weight" in names and "lm_head.weight" not in names, where
        for _, t, is_param in stored:  # the reads a save does (collective under ZeRO)
            if is_param:
                assert torch.isfinite(view.master(t)).all(), where
                for key in view.state_keys():
                    view.state(t, key)
        assert "exp_avg" in view.state_keys(), where


@pytest.mark.multiprocess
def test_tie_survives_deepspeed_at_every_zero_stage_and_expert_parallel() -> None:
    """ZeRO-0 fp32, ZeRO-1 bf16, ZeRO-2 fp32 at ep_size=2: after three steps the head is the embedding
    (one Parameter), it trained, and the optimizer state and the gathered weights hold it once."""
    run_distributed(_engine_worker, 2, timeout=300)


@pytest.mark.multiprocess
def test_from_scratch_tied_model_stays_tied_through_resume_at_another_ep_size_and_export(
    tmp_path: Path,
) -> None:
    """model.tie_embeddings=true from scratch: 3 steps on 1 process, resumed at ep_size=2 for 1 more,
    exported. The checkpoints hold one matrix (saving a lost tie raises, see checkpoint/layout.stored_tensors), the
    loaded model and the export tie it, and the export computes our logits."""
    import json

    import transformers

    from moetrain.checkpoint import read_model_state
    from moetrain.export import export
    from moetrain.testing import check_ok, run_train, tiny

    tied = ("model.tie_embeddings=true", "trainer.eval_every=0", "trainer.checkpoint_every=3")
    first = tmp_path / "ep1"
    check_ok(run_train(first, *tiny(*tied, "trainer.max_steps=3")))
    second = tmp_path / "ep2"
    resume = f"trainer.resume={first / 'checkpoints' / 'step_00000003'}"
    ep2 = ("optim.micro_batch_size=2", "parallel.ep_size=2")
    proc = check_ok(run_train(second, *tiny(*tied, *ep2, resume, "trainer.max_steps=4"), nproc=2))
    assert "resharded" in proc.stdout
    for ckpt in (first / "checkpoints" / "step_00000003", second / "checkpoints" / "step_00000004"):
        keys = set(read_model_state(ckpt))
        assert "embed.weight" in keys and "lm_head.weight" not in keys
        loaded = load_model(ckpt, load_tokenizer=False).model
        assert_tied(loaded, loaded.cfg)
    export(second, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = torch.randint(0, loaded.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded(ids).logits
        assert (back(ids).logits - ours).abs().max() <= 1e-5 * max(1.0, ours.abs().max().item())
