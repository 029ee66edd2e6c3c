"""Training from a pretrained transformers folder (``model.init_from``) and a sparse upcycled one
(``model.upcycle_from``): the same training on 1 process and on 2 ranks with ``parallel.ep_size=2``
(each rank reads only its experts), errors in one line, and the run exports as the source family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetrain.testing import (
    FAST_OVERRIDES as FAST,
)
from moetrain.testing import (
    REPO_ROOT,
    assert_equivalent,
    cached_run,
    describe,
    peak_lr,
    run_tool_in_process,
    run_train,
    tiny,
    tiny_hf_model,
)

STEPS = 5
EP2 = ("optim.micro_batch_size=2", "parallel.ep_size=2")  # x 2 processes = global batch 4, as 1 process
DP2 = ("optim.micro_batch_size=2",)  # a dense model: 2 data-parallel ranks
ROUTER_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss")

_FOLDERS: dict[str, Path] = {}


def _folder(family: str, tmp_path_factory, tie: bool = False) -> Path:
    key = f"{family}-tied" if tie else family
    if key not in _FOLDERS:
        folder = tmp_path_factory.mktemp(f"hf-{key}")
        # sharded: the index path is exercised
        tiny_hf_model(family, folder, max_shard_size="40KB", tie_word_embeddings=tie)
        _FOLDERS[key] = folder
    return _FOLDERS[key]


def _args(key: str, folder: Path, *extra: str) -> list[str]:
    return tiny(
        f"model.{key}={folder}",
        f"trainer.max_steps={STEPS}",
        "trainer.eval_every=0",
        "optim.warmup_steps=1",
        *extra,
    )


@pytest.mark.multiprocess
@pytest.mark.numerics
@pytest.mark.parametrize(
    "family",
    [
        "qwen2_moe",
        pytest.param("mixtral", marks=pytest.mark.slow),
        pytest.param("olmoe", marks=pytest.mark.slow),
        pytest.param("qwen3_moe", marks=pytest.mark.slow),
        pytest.param("mistral", marks=pytest.mark.slow),
        pytest.param("glm4_moe", marks=pytest.mark.slow),  # group-limited routing + selection bias
        pytest.param("gpt_oss", marks=pytest.mark.slow),  # expert biases sharded, sinks
        pytest.param("deepseek_v3", marks=pytest.mark.slow),  # MLA, group-limited routing
    ],
)
def test_init_from_trains_the_same_on_two_ranks(family: str, tmp_path_factory) -> None:
    folder = _folder(family, tmp_path_factory)
    one = cached_run(*_args("init_from", folder), name=f"init-{family}-1").check()
    par = DP2 if family == "mistral" else EP2
    two = cached_run(*_args("init_from", folder, *par), nproc=2, name=f"init-{family}-2").check()
    assert f"weights from {folder}" in one.proc.stdout
    keys = ("loss", "lm_loss") if family == "mistral" else ROUTER_KEYS
    assert_equivalent(two, one, range(1, STEPS + 1), keys=keys, grad_norm=True, weights_step=STEPS)


@pytest.mark.multiprocess
@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_upcycle_from_trains_the_same_on_two_ranks(family: str, tmp_path_factory) -> None:
    folder = _folder(family, tmp_path_factory)
    extra = ("model.num_experts=4", "model.top_k=2", "model.upcycle_noise=0.01")
    one = cached_run(*_args("upcycle_from", folder, *extra), name=f"up-{family}-1").check()
    two = cached_run(*_args("upcycle_from", folder, *extra, *EP2), nproc=2, name=f"up-{family}-2").check()
    assert "upcycled from" in one.proc.stdout
    assert_equivalent(two, one, range(1, STEPS + 1), keys=ROUTER_KEYS, grad_norm=True, weights_step=STEPS)


def test_finetune_recipe_uses_the_checkpoint_tokenizer_and_exports_its_family(tmp_path: Path) -> None:
    """The README's three commands on a tiny Qwen3-MoE with a tokenizer: +experiment=finetune on a
    jsonl file, then export: the run uses the folder's tokenizer, the export is a Qwen3MoeForCausalLM."""
    from moetrain.data.tokenizer import train_bpe

    src = tmp_path / "qwen3-moe"
    tiny_hf_model("qwen3_moe", src)
    data = REPO_ROOT / "moetrain" / "data" / "fixture" / "train.jsonl"
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()[:50]]
    train_bpe(texts, 400).save_pretrained(str(src))  # its own vocab (400 < the model's 512)
    run_dir = tmp_path / "run"
    proc = run_train(
        run_dir,
        "+experiment=finetune",
        f"model.init_from={src}",
        f"data.data_files={data}",
        "data.seq_len=32",
        "data.max_documents=200",
        "trainer.max_steps=3",
        "trainer.eval_every=0",
        *FAST,
        timeout=240,
    )
    assert proc.returncode == 0, describe(proc)
    assert f"tokenizer: {src}" in proc.stdout
    assert peak_lr(run_dir) == 2e-5  # the recipe's
    proc = run_tool_in_process("moetrain.export", str(run_dir), str(tmp_path / "hf"))
    assert proc.returncode == 0, describe(proc)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "Qwen3MoeForCausalLM"
    ]
    from transformers import AutoTokenizer

    ours, theirs = (
        AutoTokenizer.from_pretrained(str(tmp_path / "hf")),
        AutoTokenizer.from_pretrained(str(src)),
    )
    assert ours("To be, or not")["input_ids"][-4:] == theirs("To be, or not")["input_ids"][-4:]


def test_contradicting_shape_override_exits_2_with_one_line(tmp_path_factory, tmp_path) -> None:
    """(The other keys and messages: tests/test_hf_families.py, without a subprocess.)"""
    folder = _folder("qwen2_moe", tmp_path_factory)
    message = "model.num_experts=8 contradicts model.init_from"
    proc = run_train(tmp_path, *_args("init_from", folder, "model.num_experts=8"), timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {message}") and "Traceback" not in proc.stderr


def _source_val_loss(folder: Path, run_dir: Path) -> float:
    """transformers' loss of the source model on the run's validation blocks (as the trainer weighs them)."""
    import torch
    import torch.nn.functional as F
    import yaml
    from transformers import AutoModelForCausalLM

    from moetrain.config import train_config_from_dict
    from moetrain.data import ValidationLoader, build_data

    saved = yaml.safe_load((run_dir / "checkpoints" / "step_00000001" / "config.yaml").read_text())
    cfg = train_config_from_dict(saved)
    data = build_data(cfg.data)
    loader = ValidationLoader(data.validation, 4, num_batches=cfg.trainer.eval_batches)
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    total = n = 0.0
    with torch.no_grad():
        for batch in loader:
            logits = hf(batch["input_ids"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
            total += float(loss) * batch["labels"].numel()
            n += batch["labels"].numel()
    return total / n


@pytest.mark.multiprocess
@pytest.mark.numerics
def test_a_tied_pretrained_start_proves_itself_on_one_and_two_ranks(tmp_path_factory, tmp_path) -> None:
    """A tied Mixtral: validation loss at step 0 (banner and metrics.jsonl) equals transformers' loss of
    the source on the same blocks, on 1 process and at ep_size=2; the checkpoint holds the tied matrix
    once; after one step at a negligible LR the export computes the source's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from moetrain.checkpoint import read_model_state
    from moetrain.export import export
    from moetrain.testing import metric_by_step, rounding_rel

    folder = _folder("mixtral", tmp_path_factory, tie=True)
    args = tiny(f"model.init_from={folder}", "trainer.max_steps=1", "optim.lr=1e-12", "optim.warmup_steps=0")
    one = cached_run(*args, name="init-mixtral-tied-1").check()
    two = cached_run(*args, *EP2, nproc=2, name="init-mixtral-tied-2").check()
    want = _source_val_loss(folder, one.run_dir)
    for run in (one, two):
        assert "step 0 (loaded weights, before training): val_loss" in run.proc.stdout
        got = metric_by_step(run.run_dir, "val_loss")[0]
        assert abs(got - want) <= rounding_rel(64) * want, (got, want)
        stored = read_model_state(run.run_dir / "checkpoints" / "step_00000001")
        assert "embed.weight" in stored and "lm_head.weight" not in stored
    export(one.run_dir, tmp_path / "hf")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        src = AutoModelForCausalLM.from_pretrained(str(folder)).eval()(ids).logits
        back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
        assert back.lm_head.weight is back.model.embed_tokens.weight
        assert (back(ids).logits - src).abs().max() <= 1e-4


def test_a_start_worse_than_uniform_stops_with_one_line(tmp_path_factory, tmp_path) -> None:
    """Weights that do not compute the source's function (here: a head scaled 30x, as a head left at
    another init would) stop the run before its first step, in one line."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    tiny_hf_model("mistral", folder)
    state = load_file(str(folder / "model.safetensors"))
    state["lm_head.weight"] = state["lm_head.weight"] * 30 + torch.randn_like(state["lm_head.weight"])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    proc = run_train(tmp_path / "run", *tiny(f"model.init_from={folder}", "trainer.max_steps=1"), timeout=180)
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the weights did not load as the source model"), describe(proc)
    assert "step 0 (loaded weights, before training): val_loss" in proc.stdout
