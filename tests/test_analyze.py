"""`python -m moetrain.analyze` on a small checkpoint: readable PNGs and a consistent JSON."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from moetrain.analyze import normalized_mutual_information
from moetrain.checkpoint import save_model_file
from moetrain.config import TrainConfig
from moetrain.model import MoETransformer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = TrainConfig()
    cfg.data.name = "fixture"
    cfg.data.vocab_size = 512
    cfg.data.seq_len = 32
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads = 512, 32, 2, 4, 2
    m.ffn_hidden_size, m.num_experts, m.top_k, m.max_seq_len = 64, 4, 2, 64
    cfg.validate()
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    save_model_file(MoETransformer(m).state_dict(), folder, dataclasses.asdict(cfg))
    return folder


def test_analyze_writes_pngs_and_json(checkpoint, tmp_path):
    out = tmp_path / "analysis"
    r = subprocess.run(
        [sys.executable, "-m", "moetrain.analyze", str(checkpoint), "--out", str(out), "--batches", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["layers"]) == {"0", "1"}
    assert summary["tokens"] == 4 * 8 * 32
    for info in summary["layers"].values():
        assert len(info["expert_fraction"]) == 4
        assert sum(info["expert_fraction"]) == pytest.approx(1.0, abs=1e-9)
        assert info["imbalance"] >= 1.0
        assert 0 <= info["entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
        for dist in info["domain_expert_fraction"].values():
            assert sum(dist) == pytest.approx(1.0, abs=1e-9)
        assert info["specialisation_nmi"] is None or 0.0 <= info["specialisation_nmi"] <= 1.0
    for name in ("tokens_per_expert.png", "domain_routing.png", "router_entropy.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG"


def test_analyze_bad_path_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "moetrain.analyze", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_nmi_extremes():
    assert normalized_mutual_information(torch.tensor([[10.0, 0.0], [0.0, 10.0]])) == pytest.approx(1.0)
    assert normalized_mutual_information(torch.tensor([[5.0, 5.0], [5.0, 5.0]])) == pytest.approx(
        0.0, abs=1e-12
    )
