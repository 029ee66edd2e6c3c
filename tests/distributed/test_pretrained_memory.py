"""``model.init_from`` under expert parallelism: a rank reads only its experts from a sharded Mixtral
checkpoint in the on-disk per-expert layout (``block_sparse_moe.experts.{e}.w1/w2/w3``), so its peak
host memory during the load stays near its shard, never the whole model.

Measured like tests/distributed/test_sharded_build.py: VmHWM of a fresh process around
resolve_pretrained + build_model + load_pretrained."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# Experts dominate: 4 layers x 3 x 8 experts x 8192 x 256 fp32 = 805 MB; the rest ~2.6 MB.
BIG = dict(vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=8192)

PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from types import SimpleNamespace
    from moetrain.config import TrainConfig
    from moetrain.distributed.expert_parallel import build_model
    from moetrain.pretrained import load_pretrained, resolve_pretrained
    folder, ep_size, load = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "load"
    def peak_kib():  # VmHWM: this process's own peak
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    cfg = TrainConfig()
    cfg.data.vocab_size, cfg.data.seq_len = 512, 64
    cfg.model.init_from = folder
    cfg.parallel.ep_size = ep_size
    import moetrain.model.transformer  # imports before the baseline
    before = peak_kib()
    resolve_pretrained(cfg, [])  # includes the name-by-name check of the headers
    torch.manual_seed(0)
    model = build_model(SimpleNamespace(model=cfg.model), torch.device("cpu"), ep_rank=1, ep_size=ep_size)
    if load:
        load_pretrained(model, folder)
    after = peak_kib()
    kept = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_kib": after - before, "kept_bytes": kept}))
    """
)


def write_mixtral_checkpoint(folder: Path) -> int:
    """A random Mixtral of shape BIG as transformers stores it on disk: per-expert tensors, one
    safetensors shard per layer plus an index. Returns the bytes written."""
    from safetensors.torch import save_file

    from moetrain.config import ModelConfig
    from moetrain.hf import to_hf_config

    cfg = ModelConfig(**BIG)
    to_hf_config(cfg).save_pretrained(str(folder))
    H, F, E, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts, cfg.vocab_size
    kv = cfg.num_kv_heads * cfg.head_size
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    weight_map, total = {}, 0
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shard = {
            p + "input_layernorm.weight": torch.ones(H),
            p + "post_attention_layernorm.weight": torch.ones(H),
            p + "self_attn.q_proj.weight": rnd(H, H),
            p + "self_attn.k_proj.weight": rnd(kv, H),
            p + "self_attn.v_proj.weight": rnd(kv, H),
            p + "self_attn.o_proj.weight": rnd(H, H),
            p + "block_sparse_moe.gate.weight": rnd(E, H),
        }
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            shard.update({q + "w1.weight": rnd(F, H), q + "w3.weight": rnd(F, H), q + "w2.weight": rnd(H, F)})
        if i == 0:
            shard.update({"model.embed_tokens.weight": rnd(V, H), "model.norm.weight": torch.ones(H)})
            shard["lm_head.weight"] = rnd(V, H)
        name = f"model-{i + 1:05d}-of-{cfg.num_layers:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * 4 for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _peak(folder: Path, ep_size: int, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), str(ep_size), mode],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ep_rank_load_peak_follows_its_shard(tmp_path: Path) -> None:
    total = write_mixtral_checkpoint(tmp_path)
    build4, load4 = _peak(tmp_path, 4, "build"), _peak(tmp_path, 4, "load")
    load1 = _peak(tmp_path, 1, "load")
    mib = {k: r["peak_kib"] / 1024 for k, r in (("build4", build4), ("load4", load4), ("load1", load1))}
    print(f"checkpoint {total / 2**20:.0f} MiB; peak growth MiB: {mib}")
    # ep 4 keeps 2 of 8 experts: ~201 MB of experts + the dense part
    assert load4["kept_bytes"] < 0.3 * load1["kept_bytes"]
    # The load adds at most about one more shard's worth (a tensor at a time, mmapped pages), far
    # below the whole checkpoint (~808 MB), which a read-everything load would add.
    assert mib["load4"] - mib["build4"] < 0.5 * total / 2**20, mib
    assert mib["load4"] < 0.6 * mib["load1"], mib
