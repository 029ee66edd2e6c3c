"""gpt-oss's MXFP4 expert weights: our dequantiser equals transformers' on synthetic blocks, and a
checkpoint folder holding MXFP4 experts (as the published gpt-oss checkpoints do) loads through
model.init_from with each expert-parallel rank reading only its experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moetrain.config import TrainConfig
from moetrain.distributed.expert_parallel import build_model
from moetrain.hf.gpt_oss import FP4_VALUES, dequantize_mxfp4
from moetrain.pretrained import load_pretrained, resolve_pretrained
from moetrain.testing import tiny_hf_model


def load_ours(folder: Path, ep_rank: int = 0, ep_size: int = 1):
    """What the trainer does with model.init_from=folder, on one rank."""
    cfg = TrainConfig()
    cfg.data.vocab_size, cfg.data.seq_len = 512, 32
    cfg.model.init_from = str(folder)
    resolve_pretrained(cfg, [])
    model = build_model(cfg, torch.device("cpu"), ep_rank, ep_size)
    load_pretrained(model, folder)
    return model.eval(), cfg


def _synthetic(E: int, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks [E, rows, cols/32, 16] and scales [E, rows, cols/32] around 2^0."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 134, (E, rows, cols // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("shape", [(2, 8, 64), (3, 96, 32)])
def test_dequantize_equals_transformers(shape) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _synthetic(*shape)
    ours = dequantize_mxfp4(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)
    assert ours.shape == theirs.shape == (shape[0], shape[2], shape[1])
    assert torch.equal(ours, theirs)  # powers of two times E2M1 values: exact in fp32
    # Negative control: the nibbles in the other order are another matrix.
    swapped = ((blocks & 0x0F) << 4) | (blocks >> 4)
    assert not torch.equal(dequantize_mxfp4(swapped, scales), theirs)


def test_fp4_table_by_hand() -> None:
    # code 0b0101 = +3.0 (E2M1: exponent 2, mantissa 1 -> 1.5 * 2), times 2^(scale - 127); 0b1111 = -6; one byte holds (low, high) = (5, 15)
    blocks = torch.full((1, 1, 1, 16), 0xF5, dtype=torch.uint8)
    scales = torch.full((1, 1, 1), 128, dtype=torch.uint8)  # 2^1
    out = dequantize_mxfp4(blocks, scales)[0, :, 0]
    assert out[0::2].tolist() == [6.0] * 16 and out[1::2].tolist() == [-12.0] * 16
    assert FP4_VALUES[5] == 3.0 and FP4_VALUES[15] == -6.0


def _mxfp4_folder(src: Path, out: Path) -> dict[str, torch.Tensor]:
    """``src``'s gpt-oss checkpoint with every layer's experts replaced by MXFP4 blocks + scales in a
    second shard (as the published ones store them); returns the dequantised tensors by name."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = load_file(str(src / "model.safetensors"))
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    quant, want = {}, {}
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, a, b = state.pop(name).shape  # gate_up [E, H, 2F] / down [E, F, H]: blocks are [E, b, a/32, 16]
        blocks, scales = _synthetic(E, b, a, seed=len(want))
        quant[f"{name}_blocks"], quant[f"{name}_scales"] = blocks, scales
        want[name] = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)
    save_file(state, str(out / "model-00001-of-00002.safetensors"))
    save_file(quant, str(out / "model-00002-of-00002.safetensors"))
    files = {"model-00001-of-00002.safetensors": state, "model-00002-of-00002.safetensors": quant}
    index = {"weight_map": {n: f for f, tensors in files.items() for n in tensors}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return want


def test_init_from_dequantises_mxfp4_experts(tmp_path: Path) -> None:
    tiny_hf_model("gpt_oss", tmp_path / "bf")
    want = _mxfp4_folder(tmp_path / "bf", tmp_path / "q")
    full, _ = load_ours(tmp_path / "q")
    for i, layer in enumerate(full.moe_layers):
        gate_up = want[f"model.layers.{i}.mlp.experts.gate_up_proj"]  # [E, H, 2F], gate = 0::2
        assert torch.equal(layer.experts.w1, gate_up[..., 0::2].transpose(1, 2))
        assert torch.equal(layer.experts.v1, gate_up[..., 1::2].transpose(1, 2))
        assert torch.equal(layer.experts.w2, want[f"model.layers.{i}.mlp.experts.down_proj"])
    for rank in range(2):  # each expert-parallel rank reads its experts' blocks only
        shard, _ = load_ours(tmp_path / "q", ep_rank=rank, ep_size=2)
        for a, b in zip(shard.moe_layers, full.moe_layers, strict=True):
            assert torch.equal(a.experts.w1, b.experts.w1[2 * rank : 2 * rank + 2])
            assert torch.equal(a.experts.w2, b.experts.w2[2 * rank : 2 * rank + 2])
