"""Other sources through HF datasets, the caches, and the one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetrain import CONFIG_DIR
from moetrain.config import ConfigError, DataConfig
from moetrain.data import DataError, build_data
from moetrain.data import datasets as data_sources

from .conftest import fixture_config

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "a",
    "cat",
    "watches",
    "from",
    "the",
    "warm",
    "window",
]


def _docs(n: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40 + i % 17)) + f" #{i}" for i in range(n)]


def _one_line_error(cfg: DataConfig, match: str) -> str:
    with pytest.raises(DataError, match=match) as e:
        build_data(cfg, main_process=False)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_json_source_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    domains = ["news", "code"]
    path.write_text(
        "".join(json.dumps({"body": t, "kind": domains[i % 2]}) + "\n" for i, t in enumerate(_docs(400)))
    )
    cfg = DataConfig(
        name="json", data_files=str(path), text_field="body", domain_field="kind", seq_len=32, vocab_size=300,
        validation_fraction=0.05, data_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    bundle = build_data(cfg, main_process=False)
    assert bundle.domains == ["code", "news"]
    assert bundle.stats["documents"] == {"train": 380, "validation": 20}
    assert len(bundle.train) > 0 and len(bundle.validation) > 0
    assert set(bundle.train.domain_N.tolist()) == {0, 1}
    block, _ = bundle.validation[0]
    assert block.shape == (33,)


def test_text_source_end_to_end_with_explicit_validation_split(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("\n".join(_docs(300)) + "\n\n\n")  # blank lines are dropped
    (tmp_path / "val.txt").write_text("\n".join(_docs(20)) + "\n")
    cfg = DataConfig(
        name="text", data_files={"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "val.txt")},
        validation_split="validation", seq_len=16, vocab_size=300, data_dir=str(tmp_path / "cache"),
        max_documents=250, text_split="line",
    )  # fmt: skip
    bundle = build_data(cfg, main_process=False)
    assert bundle.domains == ["text"] and set(bundle.train.domain_N.tolist()) == {0}
    assert bundle.stats["documents"] == {"train": 250, "validation": 20}
    text = bundle.tokenizer.decode(bundle.train.blocks_NL[0].tolist())
    assert len(text) > 20 and _docs(1)[0].startswith(text)


POEM = "Shall I compare thee\nto a summer's day?\n\nThou art more lovely\nand more temperate.\n"
CODE = "def f(x):\n    return x\n\n\ndef g():\n    pass\n"


@pytest.mark.parametrize(
    ("text_split", "expected"),
    [
        (
            "line",
            ["Shall I compare thee", "to a summer's day?", "Thou art more lovely", "and more temperate."]
            + ["def f(x):", "    return x", "def g():", "    pass"],
        ),
        (
            "paragraph",
            ["Shall I compare thee\nto a summer's day?", "Thou art more lovely\nand more temperate.\n"]
            + ["def f(x):\n    return x", "\ndef g():\n    pass\n"],
        ),
        ("file", [POEM, CODE]),
    ],
)
def test_text_split_line_paragraph_file(tmp_path: Path, text_split: str, expected: list[str]) -> None:
    (tmp_path / "poem.txt").write_text(POEM)
    (tmp_path / "code.py").write_text(CODE)
    (tmp_path / "val.txt").write_text("held out\n")
    cfg = DataConfig(
        name="text",
        data_files={"train": [str(tmp_path / "poem.txt"), str(tmp_path / "code.py")], "validation": str(tmp_path / "val.txt")},
        validation_split="validation", text_split=text_split, data_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    docs = data_sources.load_documents(cfg, verbose=False)
    assert docs.train[cfg.text_field] == expected


def test_text_split_file_keeps_line_breaks_through_tokenisation(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text("\n".join(_docs(40)) + "\n")
    base = dict(name="text", data_files=str(tmp_path / "*.txt"), seq_len=16, vocab_size=300)
    whole = build_data(
        DataConfig(**base, text_split="file", data_dir=str(tmp_path / "a")), main_process=False
    )
    lines = build_data(
        DataConfig(**base, text_split="line", data_dir=str(tmp_path / "b")), main_process=False
    )
    assert whole.stats["documents"] == {"train": 1, "validation": 1}  # two files, two documents
    assert sum(lines.stats["documents"].values()) == 80
    assert "\n" in whole.tokenizer.decode(whole.train.blocks_NL.reshape(-1).tolist())
    assert "\n" not in lines.tokenizer.decode(lines.train.blocks_NL.reshape(-1).tolist())


def test_text_split_is_validated() -> None:
    with pytest.raises(
        ConfigError, match=r"data.text_split='lines' is invalid: one of line, paragraph, file"
    ):
        DataConfig(text_split="lines").validate()


def test_second_build_is_cached_and_fast(tmp_path: Path) -> None:
    cfg = fixture_config(tmp_path)
    first = build_data(cfg, main_process=False)
    start = time.perf_counter()
    second = build_data(cfg, main_process=False)
    assert time.perf_counter() - start < 2.0
    assert second.stats["tokenize_cached"] and not first.stats["tokenize_cached"]
    assert (second.train.blocks_NL == first.train.blocks_NL).all()
    assert (tmp_path / "tokenizers").is_dir() and (tmp_path / "tokenized").is_dir()


def test_missing_files(tmp_path: Path) -> None:
    _one_line_error(
        DataConfig(name="json", data_files=str(tmp_path / "nope.jsonl")), "data file not found: .*nope"
    )
    _one_line_error(DataConfig(name="parquet", data_dir=str(tmp_path)), "needs data.data_files")


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    _one_line_error(
        DataConfig(name="json", data_files=str(tmp_path / "empty.jsonl"), data_dir=str(tmp_path)), "empty"
    )
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    cfg = DataConfig(name="json", data_files=str(tmp_path / "blank.jsonl"), data_dir=str(tmp_path))
    _one_line_error(cfg, "empty: every 'text' value is blank")


def test_missing_text_field_names_the_columns(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"body": "x", "title": "y"}\n')
    cfg = DataConfig(name="json", data_files=str(tmp_path / "d.jsonl"), data_dir=str(tmp_path))
    message = _one_line_error(cfg, "text field 'text' not in dataset")
    assert "available columns: body, title" in message


def test_seq_len_larger_than_corpus_says_how_many_tokens(tmp_path: Path) -> None:
    message = _one_line_error(
        fixture_config(tmp_path, seq_len=10_000_000), r"seq_len=10000000 .* has only \d+ tokens"
    )
    assert "lower data.seq_len" in message


def test_unknown_split_lists_available(tmp_path: Path) -> None:
    _one_line_error(
        fixture_config(tmp_path, split="test"), "has no split 'test'; available: train, validation"
    )


def test_hub_offline_fails_fast_naming_the_dataset(tmp_path: Path) -> None:
    # A fresh process: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    code = (
        "from moetrain.config import DataConfig\n"
        "from moetrain.data import DataError, build_data\n"
        "try:\n"
        f"    build_data(DataConfig(name='wikitext', config_name='wikitext-103-raw-v1', data_dir={str(tmp_path)!r}))\n"
        "except DataError as e:\n"
        "    print('DataError:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - start < 30
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("DataError:")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert "could not load dataset 'wikitext' (config 'wikitext-103-raw-v1')" in lines[0]
    assert f"HF_HUB_OFFLINE=1 is set (no downloads) and it is not cached in {tmp_path / 'hf'}" in lines[0]


def test_hub_unreachable_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_sources, "_hub_offline", lambda: False)
    monkeypatch.setattr(data_sources, "_hub_reachable", lambda: False)  # no real probe in tests
    message = _one_line_error(
        DataConfig(name="wikitext", data_dir=str(tmp_path)), "cannot reach the Hugging Face Hub .*'wikitext'"
    )
    assert "HF_HUB_OFFLINE=1" in message and "data.data_files" in message


def test_loader_typo_is_caught_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.name='jsonl' .* did you mean data.name=json\?"):
        build_data(DataConfig(name="jsonl", data_files="x.jsonl", data_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_arrow_loader_reads_local_files(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": _docs(60)}).save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    cfg = DataConfig(name="arrow", data_files=str(arrow), seq_len=32, vocab_size=300, data_dir=str(tmp_path))
    bundle = build_data(cfg, main_process=False)
    assert bundle.stats["documents"]["train"] + bundle.stats["documents"]["validation"] == 60


def test_invalid_config_is_rejected_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        build_data(fixture_config(tmp_path, seq_len=0))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_barrier_order(tmp_path: Path) -> None:
    calls: list[str] = []
    build_data(fixture_config(tmp_path), main_process=True, barrier=lambda: calls.append("main"))
    build_data(fixture_config(tmp_path), main_process=False, barrier=lambda: calls.append("other"))
    assert calls == ["main", "other"]


def test_fixture_config_composes_to_a_full_data_config() -> None:
    """data=fixture starts from the same defaults as builtin (the DataConfig base node) and changes
    only its name, vocabulary and block length."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        builtin = OmegaConf.to_container(compose("train").data, resolve=True)
        fixture = OmegaConf.to_container(compose("train", overrides=["data=fixture"]).data, resolve=True)
    assert list(builtin) == list(fixture)
    assert fixture["name"] == "fixture" and fixture["vocab_size"] == 512 and fixture["seq_len"] == 64
    assert {k for k in fixture if fixture[k] != builtin[k]} == {"name", "vocab_size", "seq_len"}
    DataConfig(**fixture).validate()
