"""`python -m moetrain.analyze` on a small checkpoint: readable PNGs and a consistent JSON."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from moetrain.analyze import (
    analyze,
    default_out_dir,
    domain_routing_figure,
    normalized_mutual_information,
    resolve_data_paths,
)
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
        # fractions of integer counts in float64: their sum is 1 to a few 1e-16; 1e-9 is slack, a
        # missing or double-counted expert is off by >= 1/(4 * 8 * 32 * 2)
        assert sum(info["expert_fraction"]) == pytest.approx(1.0, abs=1e-9)
        assert info["imbalance"] >= 1.0
        # a mean of fp32 per-token entropies, each <= ln 4 up to a few fp32 ulps (1.2e-7 each)
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


def _summary(num_layers: int, domains: list[str], experts: int) -> dict:
    layers = {}
    for layer in range(num_layers):
        per_domain = {}
        for d, name in enumerate(domains):
            row = torch.full((experts,), 1.0)
            row[(layer + d) % experts] = 1.0 + 3.0 * (layer + 1)  # later layers more peaked
            per_domain[name] = (row / row.sum()).tolist()
        layers[str(layer)] = {"domain_expert_fraction": per_domain, "specialisation_nmi": 0.1 * layer}
    return {"domains": domains, "layers": layers}


def test_domain_routing_panels_share_one_colour_scale_with_a_colour_bar():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = ["literature", "docs", "code"]
    summary = _summary(6, domains, 8)
    fig = domain_routing_figure(summary, list(range(6)), domains, 8)
    try:
        panels = [ax for ax in fig.axes if ax.images]
        assert len(panels) == 6
        limits = {ax.images[0].get_clim() for ax in panels}
        assert len(limits) == 1  # one scale for every layer
        vmin, vmax = limits.pop()
        largest = max(
            max(max(r) for r in v["domain_expert_fraction"].values()) for v in summary["layers"].values()
        )
        assert vmin == 0.0 and vmax == pytest.approx(largest)
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == 1 and "fraction" in bars[0].get_ylabel()
        # domain names only on the first column (4 columns): no names squeezed between panels
        labelled = [
            i for i, ax in enumerate(panels) if [t.get_text() for t in ax.get_yticklabels()] == domains
        ]
        assert labelled == [0, 4]
        # no two panels' boxes (titles and labels included) overlap
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [ax.get_tightbbox(renderer) for ax in panels]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), (i, j)
    finally:
        plt.close(fig)


def _fake_run(root, data_values: dict, train_cwd):
    """A run folder as training leaves it: .hydra/hydra.yaml (with the working directory) and a
    checkpoint whose config has relative data paths."""
    import yaml

    cfg = TrainConfig()
    for k, v in data_values.items():
        setattr(cfg.data, k, v)
    cfg.data.vocab_size, cfg.data.seq_len = 300, 16
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads = 320, 32, 1, 4, 2
    m.ffn_hidden_size, m.num_experts, m.top_k, m.max_seq_len = 64, 4, 2, 64
    cfg.validate()
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"cwd": str(train_cwd)}}})
    )
    folder = run / "checkpoints" / "step_00000003"
    torch.manual_seed(0)
    save_model_file(MoETransformer(m).state_dict(), folder, dataclasses.asdict(cfg))
    (run / "checkpoints" / "latest").write_text("step_00000003")
    return run


def test_relative_data_files_resolve_against_the_training_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"  # where training was started
    (project / "corpus").mkdir(parents=True)
    lines = [json.dumps({"text": f"document {i} " + "words and more words " * 8}) for i in range(200)]
    (project / "corpus" / "docs.jsonl").write_text("\n".join(lines) + "\n")
    run = _fake_run(
        tmp_path, {"name": "json", "data_files": "corpus/docs.jsonl", "data_dir": "cache"}, project
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    summary = analyze(str(run), batches=2, batch_size=2)
    out = run / "analysis" / "step_00000003"  # in the run dir, not inside the pruned checkpoint
    assert summary["out_dir"] == str(out) and (out / "summary.json").is_file()
    assert not (run / "checkpoints" / "step_00000003" / "analysis").exists()
    assert (project / "cache").is_dir()  # data.data_dir resolved the same way
    assert list(elsewhere.iterdir()) == []


def test_resolve_data_paths_leaves_absolute_hub_and_unknown_alone(tmp_path):
    from moetrain.config import DataConfig

    (tmp_path / "tok").mkdir()
    data = DataConfig(
        name="wikitext",
        data_files={"train": ["a/*.txt", "/abs/b.txt"], "validation": "c.txt"},
        tokenizer="tok",
    )
    resolve_data_paths(data, tmp_path)
    assert data.data_files == {
        "train": [f"{tmp_path}/a/*.txt", "/abs/b.txt"],
        "validation": f"{tmp_path}/c.txt",
    }
    assert data.name == "wikitext" and data.tokenizer == str(tmp_path / "tok") and data.data_dir is None
    same = DataConfig(name="json", data_files="x.jsonl")
    assert resolve_data_paths(same, None).data_files == "x.jsonl"  # unknown cwd: unchanged


def test_default_out_dir():
    from pathlib import Path

    assert default_out_dir(Path("/r/run/checkpoints/step_00000007")) == Path("/r/run/analysis/step_00000007")
    assert default_out_dir(Path("/r/saved/step_00000007")) == Path("/r/saved/analysis/step_00000007")


def test_help_explains_every_option():
    r = subprocess.run(
        [sys.executable, "-m", "moetrain.analyze", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "validation batches" in text and "sequences per batch" in text and "analysis/step_N" in text
