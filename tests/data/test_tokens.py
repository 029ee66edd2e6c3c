"""Pre-tokenized token files (data.name=tokens) and python -m moetrain.data.prepare.

- round trip: what write_npy / np.save / raw .bin / Megatron .bin+.idx hold is what the blocks read,
  across file boundaries; memory-mapped, never loaded whole;
- one-line errors: missing files, headerless without a dtype, wrong sizes, 2-D or float arrays, ids
  beyond the tokenizer;
- prepare on the fixture corpus writes files that train to the same losses as the fixture loader.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from moetrain.config import DataConfig
from moetrain.data import build_data, build_loaders
from moetrain.data.errors import DataError
from moetrain.data.tokens import TokenBlocks, TokenStream, open_token_file, token_datasets, write_npy


def test_npy_round_trip_across_files(tmp_path: Path):
    stream = np.arange(1, 1001, dtype=np.uint16)
    write_npy(tmp_path / "a.npy", [stream[:300], stream[300:650]], 650, np.dtype(np.uint16))
    np.save(tmp_path / "b.npy", stream[650:])
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind
    s = TokenStream([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")], None)
    assert isinstance(s.arrays[0], np.memmap) and len(s) == 1000
    blocks = TokenBlocks(s, seq_len=9)  # 100 blocks of 10; block 64 ends where a.npy does
    assert len(blocks) == 100
    rows, domain = blocks.get_batch(torch.tensor([0, 64, 99]))
    assert rows.dtype == torch.long and domain.tolist() == [0, 0, 0]
    assert rows.tolist() == [list(range(1, 11)), list(range(641, 651)), list(range(991, 1001))]
    assert s.read(645, 10).tolist() == list(range(646, 656))  # across the file boundary


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_raw_bin_and_headerless_npy_need_a_dtype(tmp_path: Path, dtype: str):
    data = np.arange(70000 if dtype == "uint32" else 500, dtype=dtype)
    for name in ("tokens.bin", "olmo.npy"):  # OLMo-core / Dolma .npy files have no NumPy header
        data.tofile(tmp_path / name)
        assert np.array_equal(open_token_file(str(tmp_path / name), dtype), data)
        with pytest.raises(DataError, match="has no NumPy header: set data.token_dtype"):
            open_token_file(str(tmp_path / name), None)


def test_megatron_index_gives_the_dtype(tmp_path: Path):
    data = np.arange(100, dtype=np.int32)
    data.tofile(tmp_path / "corpus_text_document.bin")
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4)  # 4 = int32
    (tmp_path / "corpus_text_document.idx").write_bytes(header + b"\x00" * 16)
    assert np.array_equal(open_token_file(str(tmp_path / "corpus_text_document.bin"), None), data)
    with pytest.raises(DataError, match="Megatron index .* says int32"):
        open_token_file(str(tmp_path / "corpus_text_document.bin"), "uint16")


def test_bad_token_files_fail_in_one_line(tmp_path: Path):
    np.save(tmp_path / "two_d.npy", np.zeros((4, 4), dtype=np.uint16))
    np.save(tmp_path / "floats.npy", np.zeros(8, dtype=np.float32))
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    cases = [
        (str(tmp_path / "nope.npy"), None, "token file not found"),
        (str(tmp_path / "two_d.npy"), None, "holds a 2-D uint16 array"),
        (str(tmp_path / "floats.npy"), None, "holds a 1-D float32 array"),
        (str(tmp_path / "odd.bin"), "uint16", "7 bytes, not a multiple of 2"),
    ]
    for path, dtype, message in cases:
        with pytest.raises(DataError, match=message) as e:
            token_datasets(path, dtype, 4, 0.1, 100)
        assert "\n" not in str(e.value)
    np.save(tmp_path / "big.npy", np.array([1, 2, 3, 500, 4, 5, 6, 7, 8, 9], dtype=np.uint16))
    train, _, _ = token_datasets(
        {"train": str(tmp_path / "big.npy"), "validation": str(tmp_path / "big.npy")}, None, 4, 0.1, 100
    )
    with pytest.raises(
        DataError, match=r"token id 500 in .*big.npy at token 0 is outside the tokenizer's 100 ids"
    ):
        train.get_batch(torch.tensor([0]))
    with pytest.raises(DataError, match="too few tokens"):
        token_datasets(str(tmp_path / "big.npy"), None, 64, 0.1, 1000)


def test_validation_is_held_out_from_the_end_without_validation_files(tmp_path: Path):
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.uint16))
    train, val, _ = token_datasets(str(tmp_path / "t.npy"), None, 9, 0.1, 2000)
    assert (len(train), len(val)) == (90, 10)
    assert val.get_batch(torch.tensor([0]))[0][0, 0] == 900  # after every training block


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moetrain.data.prepare import data_config, prepare

    root = tmp_path_factory.mktemp("prepared")
    cfg = data_config(["data=fixture", f"data.data_dir={root / 'cache'}"])
    prepare(cfg, root / "tokens", progress=False)
    return root


def test_prepare_writes_the_blocks_the_text_loader_packs(prepared: Path):
    fixture = build_data(
        DataConfig(name="fixture", vocab_size=512, seq_len=64, data_dir=str(prepared / "cache")),
        main_process=False,
    )
    tokens_cfg = DataConfig(
        name="tokens", data_files=str(prepared / "tokens"), seq_len=64, data_dir=str(prepared / "cache")
    )
    tokens = build_data(tokens_cfg, main_process=False)
    assert len(tokens.tokenizer) == len(fixture.tokenizer)
    for split in ("train", "validation"):
        a, b = getattr(fixture, split), getattr(tokens, split)
        assert len(a) == len(b)
        idx = torch.tensor([0, 1, len(a) // 2, len(a) - 1])
        assert torch.equal(a.get_batch(idx)[0], b.get_batch(idx)[0])
    arr = np.load(prepared / "tokens" / "train.npy", mmap_mode="r")
    assert arr.dtype == np.uint16 and int((arr == tokens.tokenizer.eos_token_id).sum()) == 322
    tokens_cfg.document_masking = True
    batch = next(build_loaders(tokens, tokens_cfg, 2)[0])
    is_eos = batch["input_ids"] == tokens.tokenizer.eos_token_id
    assert torch.equal(batch["document_ids"][:, -1], is_eos.sum(1).int() - is_eos[:, -1].int())


def test_prepare_cli_errors_in_one_line(tmp_path: Path):
    from moetrain.data.prepare import main

    assert main([str(tmp_path / "o"), "data.name=mixture", "--no-progress"]) == 2
    assert main([str(tmp_path / "o"), "trainer.max_steps=3", "--no-progress"]) == 2
