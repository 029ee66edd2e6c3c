"""RoPE scalings (``model.rope_scaling``: linear, dynamic, llama3, yarn): rotary tables and logits equal
transformers' for tiny Llama configs, init_from and export round trips keep them, bad values fail in
one line naming the field, and a model trained from scratch uses them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from moetrain.config import ConfigError, TrainConfig
from moetrain.distributed.expert_parallel import build_model
from moetrain.hf import from_hf_config, hf_model_from_state
from moetrain.model.rope import RotaryEmbedding
from moetrain.pretrained import load_pretrained, resolve_pretrained
from moetrain.testing import assert_close_scaled, rounding_rel, tiny_hf_model, tiny_model_config

MAX_POS = 32
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    # attention_factor from the default mscale (0.1 ln 4 + 1): cos / sin scaled by 1.139
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    # DeepSeek's form: mscale / mscale_all_dim, other betas
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "beta_fast": 16,
        "beta_slow": 2,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
    },
}
# Same math, same fp32 operations (positions x inv_freq, cos, sin): tables agree to a few ulps;
# logits (two layers, other attention kernels) to 64 ulps of their scale, well under 1e-5 absolute.
TABLE_REL, LOGITS_REL = rounding_rel(8), rounding_rel(64)


def _hf_rope(name: str):
    return {**SCALINGS[name], "rope_theta": 10000.0}


def _hf_llama(name: str, folder: Path | None = None):
    return tiny_hf_model("llama", folder, max_position_embeddings=MAX_POS, rope_parameters=_hf_rope(name))


def _tables(name: str, T: int):
    hf = _hf_llama(name)
    ours_cfg = from_hf_config(hf.config)
    ours = RotaryEmbedding(
        ours_cfg.head_size, ours_cfg.max_seq_len, ours_cfg.rope_theta, ours_cfg.rope_scaling
    )
    positions = torch.arange(T)
    x = torch.zeros(1, T, ours_cfg.head_size)
    theirs = hf.model.rotary_emb(x, positions[None])
    return ours(positions, torch.float32), (theirs[0][0], theirs[1][0])


@pytest.mark.numerics
@pytest.mark.parametrize("name", list(SCALINGS))
def test_rotary_tables_equal_transformers(name: str) -> None:
    T = MAX_POS + 16 if name == "dynamic" else MAX_POS  # dynamic: past max_seq_len, where it acts
    (cos, sin), (hcos, hsin) = _tables(name, T)
    assert_close_scaled(cos, hcos, f"{name} cos", rel=TABLE_REL)
    assert_close_scaled(sin, hsin, f"{name} sin", rel=TABLE_REL)
    plain = RotaryEmbedding(cos.shape[-1], MAX_POS, 10000.0)(torch.arange(T), torch.float32)
    assert (plain[0] - hcos).abs().max() > 1e-2  # negative control: the scaling changes the table


def _ids(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(seed))


def _load(folder: Path):
    cfg = TrainConfig()
    cfg.data.vocab_size, cfg.data.seq_len = 512, 32
    cfg.model.init_from = str(folder)
    resolve_pretrained(cfg, [])
    torch.manual_seed(0)
    model = build_model(SimpleNamespace(model=cfg.model), torch.device("cpu"))
    load_pretrained(model, folder)
    return model.eval(), cfg


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["llama3", "yarn", "yarn_mscale", "linear", "dynamic"])
def test_init_from_and_export_keep_transformers_logits(name: str, tmp_path: Path) -> None:
    hf = _hf_llama(name, tmp_path / "src")
    ours, cfg = _load(tmp_path / "src")
    assert cfg.model.rope_scaling["rope_type"] == SCALINGS[name]["rope_type"]
    T = MAX_POS + 8 if name == "dynamic" else MAX_POS
    ids = _ids(T)
    with torch.no_grad():
        want = hf(ids).logits
        assert_close_scaled(ours(ids).logits, want, f"{name} logits", rel=LOGITS_REL)
        hf_model_from_state(cfg.model, ours.state_dict()).save_pretrained(str(tmp_path / "out"))
        saved = json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]
        for k, v in SCALINGS[name].items():
            assert saved[k] == v, (k, saved)
        back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
        assert_close_scaled(back(ids).logits, want, f"{name} exported logits", rel=LOGITS_REL)
        # negative control: the same weights with plain RoPE are far off
        plain, _ = _load(tmp_path / "src")
        plain.rope = RotaryEmbedding(cfg.model.head_size, MAX_POS, cfg.model.rope_theta)
        assert (plain(ids).logits - want).abs().max() > 20 * LOGITS_REL * want.abs().max()


def test_from_scratch_model_uses_its_scaling() -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config(max_seq_len=MAX_POS, rope_scaling=dict(SCALINGS["yarn"]))
    from moetrain.model import MoETransformer

    model = MoETransformer(cfg)
    assert model.rope.attention_factor == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    out = model(_ids(16) % cfg.vocab_size, _ids(16, 2) % cfg.vocab_size)
    assert torch.isfinite(out.loss)
    from moetrain.plan import build_plan

    assert build_plan(cfg)["shape"]["rope_scaling"] == SCALINGS["yarn"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"rope_type": "longrope", "factor": 2}, "model.rope_scaling.rope_type='longrope' is invalid"),
        ({"rope_type": "llama3", "factor": 8}, "model.rope_scaling.low_freq_factor is missing"),
        ({"rope_type": "linear", "factor": 0.5}, "model.rope_scaling.factor=0.5 is invalid"),
        ({"rope_type": "yarn", "factor": 4, "rope_theta": 1e4}, "model.rope_scaling.rope_theta is not a field"),
        (
            {"rope_type": "yarn", "factor": 4, "beta_fast": 1, "beta_slow": 2},
            "model.rope_scaling.beta_slow=2 is invalid",
        ),
        (
            {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
             "original_max_position_embeddings": 8},
            "model.rope_scaling.high_freq_factor=1 is invalid",
        ),
        ("yarn", "model.rope_scaling='yarn' is invalid"),
    ],
)  # fmt: skip
def test_bad_rope_scaling_fails_in_one_line(value, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        tiny_model_config(rope_scaling=value)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_unsupported_hf_rope_is_refused_in_one_line() -> None:
    hf_cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=64,
        intermediate_size=48,
        max_position_embeddings=32,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                         "long_factor": [2.0] * 4, "original_max_position_embeddings": 16},
    )  # fmt: skip
    with pytest.raises(ValueError, match="rope_type='longrope' is not supported"):
        from_hf_config(hf_cfg)
