"""The packed cache: blocks written once, memory-mapped by every run, read without ``datasets``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from moetrain.data import build_data
from moetrain.data.packed_cache import packed_dir

from .conftest import fixture_config


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file mappings."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[5]))
    return out


def _backing_file(t: torch.Tensor) -> str | None:
    ptr = t.data_ptr()
    return next((path for start, end, path in _mapped_files() if start <= ptr < end), None)


def test_blocks_are_memory_mapped_from_the_cache_on_every_build(tmp_path: Path) -> None:
    cfg = fixture_config(tmp_path)
    first = build_data(cfg, main_process=False)  # builds the caches
    second = build_data(cfg, main_process=False)  # reads them
    for bundle in (first, second):
        for split, blocks in (("train", bundle.train), ("validation", bundle.validation)):
            backing = _backing_file(blocks.blocks_NL)
            assert backing is not None and backing.endswith(f"{split}_blocks.npy"), backing
            assert Path(backing).parent.parent == (tmp_path / "packed").resolve()
    assert torch.equal(first.train.blocks_NL, second.train.blocks_NL)
    assert torch.equal(first.validation.domain_N, second.validation.domain_N)
    assert first.domains == second.domains and first.stats["blocks"] == second.stats["blocks"]
    assert first.stats["tokens_per_domain"] == second.stats["tokens_per_domain"]
    # A batch is an ordinary writable tensor; the cache itself is never written.
    batch, _ = second.train.get_batch(torch.tensor([3, 0]))
    batch += 1
    assert torch.equal(second.train.blocks_NL[[3, 0]].long(), batch - 1)


def test_key_follows_what_the_blocks_depend_on(tmp_path: Path) -> None:
    base = packed_dir(fixture_config(tmp_path), "fixture-abc", "tok")
    assert base == packed_dir(fixture_config(tmp_path), "fixture-abc", "tok")
    for changed in (
        packed_dir(fixture_config(tmp_path, seq_len=32), "fixture-abc", "tok"),
        packed_dir(fixture_config(tmp_path), "fixture-abd", "tok"),
        packed_dir(fixture_config(tmp_path), "fixture-abc", "tok2"),
        packed_dir(fixture_config(tmp_path, max_documents=5), "fixture-abc", "tok"),
        packed_dir(fixture_config(tmp_path, validation_fraction=0.2), "fixture-abc", "tok"),
    ):
        assert changed != base


def test_seq_len_gets_its_own_blocks(tmp_path: Path) -> None:
    long = build_data(fixture_config(tmp_path, seq_len=64), main_process=False)
    short = build_data(fixture_config(tmp_path, seq_len=32), main_process=False)
    assert long.train.seq_len == 64 and short.train.seq_len == 32
    assert len(list((tmp_path / "packed").iterdir())) == 2
    # Same tokens, cut differently.
    n = 33 * 64
    assert torch.equal(long.train.blocks_NL.reshape(-1)[:n], short.train.blocks_NL.reshape(-1)[:n])


def test_warm_start_does_not_import_datasets(tmp_path: Path) -> None:
    """Once packed, the fixture (and the builtin corpus) loads with no ``datasets`` (nor pandas or
    pyarrow) in the process; the cold build needs it, which is the control."""
    script = (
        "import json, sys\n"
        "from moetrain.data import build_data\n"
        "from tests.data.conftest import fixture_config\n"
        f"b = build_data(fixture_config({str(tmp_path)!r}), main_process=False)\n"
        "print(json.dumps({'loaded': [m for m in ('datasets', 'pandas', 'pyarrow') if m in sys.modules],"
        " 'blocks': len(b.train), 'cached': b.stats['tokenize_cached']}))\n"
    )
    root = Path(__file__).resolve().parents[2]

    def run() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold, warm = run(), run()
    assert cold["loaded"] == ["datasets", "pandas", "pyarrow"] and not cold["cached"]
    assert warm["loaded"] == [] and warm["cached"]
    assert warm["blocks"] == cold["blocks"] > 0
