"""Training from a pretrained transformers folder (``model.init_from``) and a sparse upcycled one
(``model.upcycle_from``): the same training on 1 process and on 2 ranks with ``parallel.ep_size=2``
(each rank reads only its experts), errors in one line, and the run exports as the source family."""

from __future__ import annotations

import json
import sys
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
    offline_env,
    peak_lr,
    run_command,
    run_train,
    tiny,
    tiny_hf_model,
)

STEPS = 5
EP2 = ("optim.micro_batch_size=2", "parallel.ep_size=2")  # x 2 processes = global batch 4, as 1 process
DP2 = ("optim.micro_batch_size=2",)  # a dense model: 2 data-parallel ranks
ROUTER_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss")

_FOLDERS: dict[str, Path] = {}


def _folder(family: str, tmp_path_factory) -> Path:
    if family not in _FOLDERS:
        folder = tmp_path_factory.mktemp(f"hf-{family}")
        tiny_hf_model(family, folder, max_shard_size="40KB")  # sharded: the index path is exercised
        _FOLDERS[family] = folder
    return _FOLDERS[family]


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
    proc = run_command(
        [sys.executable, "-m", "moetrain.export", str(run_dir), str(tmp_path / "hf")],
        env=offline_env(),
        timeout=120,
    )
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
