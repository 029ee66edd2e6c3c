"""Data tests use the committed fixture corpus and per-test data dirs: no network, ever."""

from __future__ import annotations

from pathlib import Path

import pytest

from moetrain.config import DataConfig
from moetrain.data import DataBundle, build_data


def fixture_config(data_dir: Path, **overrides: object) -> DataConfig:
    values: dict[str, object] = {
        "name": "fixture",
        "vocab_size": 512,
        "seq_len": 64,
        "data_dir": str(data_dir),
    }
    values.update(overrides)
    return DataConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def fixture_bundle(tmp_path_factory: pytest.TempPathFactory) -> DataBundle:
    return build_data(fixture_config(tmp_path_factory.mktemp("data")), main_process=False)
