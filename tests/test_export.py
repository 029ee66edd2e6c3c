"""``python -m moetrain.export``: a checkpoint becomes a transformers folder with the same logits."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetrain.checkpoint import save_model_file
from moetrain.config import ModelConfig
from moetrain.export import main as export_main
from moetrain.generate import encode_prompt, generate_text
from moetrain.model import MoETransformer
from moetrain.testing import assert_close_scaled, rounding_rel, tiny_model_config

# The exported transformers model computes our function with its own kernels (see LOGITS_REL in
# tests/test_hf_parity.py): logits agree to 64 ulps of their scale; a wrong export is off by ~1e-1.
LOGITS_REL = rounding_rel(64)

REPO = Path(__file__).resolve().parents[1]
SENTENCES = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "or to take arms against a sea of troubles and by opposing end them.",
    "The quick brown fox jumps over the lazy dog.",
] * 4


def _cfg(**kw) -> ModelConfig:
    return tiny_model_config(**{"vocab_size": 320, "tie_embeddings": True, **kw})


@pytest.fixture(scope="module")
def tokenizer():
    from moetrain.data.tokenizer import train_bpe

    return train_bpe(SENTENCES, vocab_size=300)


def _make_checkpoint(folder: Path, cfg: ModelConfig, tokenizer=None, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    save_model_file(model.state_dict(), folder, {"model": dataclasses.asdict(cfg)})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / "tokenizer"))
    return model


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "moetrain.export", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("export")
    model = _make_checkpoint(root / "ckpt", _cfg(), tokenizer)
    result = _run_cli(str(root / "ckpt"), str(root / "hf"))
    return root, model, result


@pytest.mark.numerics
def test_cli_exports_a_loadable_mixtral(exported, tokenizer, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, model, result = exported
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "MixtralForCausalLM" in lines[0], result.stdout
    out = root / "hf"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_scaled(hf(ids).logits, model(ids).logits, "exported logits", rel=LOGITS_REL)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == _cfg().max_seq_len
    assert hf.generation_config.eos_token_id == tokenizer.eos_token_id
    assert (
        hf.config.eos_token_id == tokenizer.eos_token_id and hf.config.pad_token_id == tokenizer.pad_token_id
    )


def test_refuses_to_overwrite_unless_forced(exported, capsys) -> None:
    root, _, _ = exported
    before = (root / "hf" / "model.safetensors").stat().st_mtime_ns
    assert export_main([str(root / "ckpt"), str(root / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--force" in err and "\n" not in err
    assert (root / "hf" / "model.safetensors").stat().st_mtime_ns == before
    assert export_main([str(root / "ckpt"), str(root / "hf"), "--force"]) == 0
    assert (root / "hf" / "config.json").is_file()
    assert not [p for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_bad_checkpoint_path_is_a_one_line_error(tmp_path) -> None:
    result = _run_cli(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.numerics
def test_run_folder_dense_model_and_bf16(tmp_path, capsys) -> None:
    """A run folder resolves through checkpoints/latest; a dense model exports as Mistral."""
    from transformers import AutoModelForCausalLM

    cfg = _cfg(num_experts=0, tie_embeddings=False)
    model = _make_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000007", cfg)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000007\n")
    assert export_main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "MistralForCausalLM" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert_close_scaled(hf(ids).logits, model(ids).logits, "exported dense logits", rel=LOGITS_REL)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "hf16"), "--dtype", "bf16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf16").dtype == torch.bfloat16


def test_interleaved_model_is_refused(tmp_path, capsys) -> None:
    _make_checkpoint(tmp_path / "ckpt", _cfg(moe_every=2))
    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "MoE FFN in every layer" in err and "\n" not in err
    assert not (tmp_path / "hf").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_capacity_factor_warns(tmp_path, capsys) -> None:
    from moetrain.config import MoEConfig

    _make_checkpoint(tmp_path / "ckpt", _cfg(moe=MoEConfig(capacity_factor=1.0)))
    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert "warning: " in capsys.readouterr().err


def test_greedy_generation_agrees_between_checkpoint_and_export(exported) -> None:
    root, _, _ = exported
    kw = {"max_new_tokens": 12, "temperature": 0.0, "device": "cpu", "ignore_eos": True}
    ours, n_ours = generate_text(root / "ckpt", "To be, or not", **kw)
    theirs, n_theirs = generate_text(root / "hf", "To be, or not", **kw)
    assert n_ours == n_theirs == 12
    assert ours == theirs and ours.startswith("To be, or not")


@pytest.mark.parametrize("text", ["To be, or not to be", "The quick brown fox.\nA second line", "x"])
def test_exported_tokenizer_encodes_like_training(exported, tokenizer, text) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    root, _, _ = exported
    tok = AutoTokenizer.from_pretrained(root / "hf")
    # training: a separator (eos = bos) before every document, then the document's ids
    body = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert tok(text)["input_ids"] == [tokenizer.bos_token_id, *body] == encode_prompt(tokenizer, text)
    # readers of tokenizer.json alone (no transformers) get the same ids
    assert Tokenizer.from_file(str(root / "hf" / "tokenizer.json")).encode(text).ids == [0, *body]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_exported_files_are_readable_by_everyone(exported) -> None:
    root, _, result = exported
    assert result.returncode == 0, result.stderr
    mask = os.umask(0)
    os.umask(mask)
    out = root / "hf"
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_exported_modes_follow_the_umask(tmp_path) -> None:
    _make_checkpoint(tmp_path / "ckpt", _cfg())
    old = os.umask(0o027)
    try:
        assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o750
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "hf").iterdir()} == {0o640}
