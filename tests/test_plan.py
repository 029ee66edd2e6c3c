"""moetrain.plan: parameter counts vs published figures, FLOPs, memory layout, all-to-all, the CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moetrain import CONFIG_DIR
from moetrain.config import ConfigError, ModelConfig, model_config_from_dict
from moetrain.plan import (
    all_to_all_volume,
    build_plan,
    check_memory_fits,
    count_params,
    dense_equivalent,
    flops_per_token,
    host_available_memory,
    machine_memory,
    memory_plan,
    plan_summary,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = CONFIG_DIR


def preset(name: str, *overrides: str) -> ModelConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="plan", overrides=[f"model={name}", *overrides])
    return model_config_from_dict(OmegaConf.to_container(cfg.model, resolve=True))


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moetrain.plan", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


# Published totals / actives (model cards, papers), checked to 0.5%.
PUBLISHED = {
    "mixtral_8x7b": (46.7e9, 12.9e9),
    "mixtral_8x22b": (141e9, 39.1e9),
    "olmoe_1b_7b": (6.92e9, 1.28e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    total, active = PUBLISHED[name]
    counts = count_params(preset(name))
    assert counts["total"] == pytest.approx(total, rel=0.005)
    assert counts["active"] == pytest.approx(active, rel=0.005)


def test_mixtral_8x22b_active_is_about_39b():
    assert count_params(preset("mixtral_8x22b"))["active"] == pytest.approx(39e9, rel=0.005)


def test_mixtral_8x7b_exact_breakdown():
    c = count_params(preset("mixtral_8x7b"))
    h, v, layers = 4096, 32000, 32
    assert c["total_breakdown"]["embedding"] == c["total_breakdown"]["lm_head"] == v * h
    # q, o: H x (32 * 128); k, v: H x (8 * 128)
    assert c["total_breakdown"]["attention"] == layers * (2 * h * 4096 + 2 * h * 1024)
    assert c["total_breakdown"]["router"] == layers * h * 8
    assert c["total_breakdown"]["norms"] == (2 * layers + 1) * h
    assert c["total_breakdown"]["experts"] == layers * 8 * 3 * h * 14336
    assert c["active_breakdown"]["experts"] == layers * 2 * 3 * h * 14336
    assert c["total"] == sum(c["total_breakdown"].values()) == 46_702_792_704
    assert c["active"] == sum(c["active_breakdown"].values()) == 12_879_925_248
    assert c["expert_params"] + c["non_expert_params"] == c["total"]


def test_dense_model_total_equals_active():
    cfg = preset("dense_small")
    c = count_params(cfg)
    assert cfg.num_experts == 0
    assert c["total"] == c["active"]
    assert c["total_breakdown"]["experts"] == c["total_breakdown"]["router"] == 0
    assert c["moe_layers"] == 0
    assert all_to_all_volume(cfg, ep_size=1)["per_token"]["training"] == 0


def test_dense_small_is_the_dense_equivalent_of_mixtral_small():
    moe = dense_equivalent(preset("mixtral_small"))
    assert moe["total_params"] == count_params(preset("dense_small"))["total"]


def test_tied_embeddings_and_moe_every():
    cfg = dataclasses.replace(ModelConfig(), tie_embeddings=True, moe_every=2, dense_ffn_hidden_size=384)
    c = count_params(cfg)
    assert c["total_breakdown"]["lm_head"] == 0
    assert c["moe_layers"] == 2 and c["dense_layers"] == 2
    assert c["total_breakdown"]["dense_ffn"] == 2 * 3 * 256 * 384
    # the tied head is still a matmul
    f = flops_per_token(cfg)
    assert f["matmul_params"] == c["active"] - c["active_breakdown"]["embedding"] - c["active_breakdown"][
        "norms"
    ] + (cfg.vocab_size * cfg.hidden_size)


def test_count_matches_the_real_module():
    torch = pytest.importorskip("torch")
    try:
        from moetrain.model import MoETransformer
    except ImportError as e:  # the model lives in another part of the tree
        pytest.skip(f"moetrain.model not importable: {e}")
    for cfg in (
        dataclasses.replace(ModelConfig(), hidden_size=64, num_heads=4, ffn_hidden_size=96, vocab_size=512),
        dataclasses.replace(
            ModelConfig(), hidden_size=64, num_heads=4, vocab_size=512, moe_every=2, dense_ffn_hidden_size=80
        ),
        dataclasses.replace(ModelConfig(), hidden_size=64, num_heads=4, vocab_size=512, num_experts=0),
        # the pretrained families' options: QK-norm, q/k/v bias, a gated shared expert, mlp_only_layers
        dataclasses.replace(ModelConfig(), hidden_size=64, num_heads=4, vocab_size=512, qk_norm="full"),
        dataclasses.replace(
            ModelConfig(), hidden_size=64, num_heads=4, vocab_size=512, qk_norm="per_head", head_dim=24
        ),
        dataclasses.replace(
            ModelConfig(),
            hidden_size=64,
            num_heads=4,
            vocab_size=512,
            attention_bias=True,
            shared_expert_intermediate_size=40,
            shared_expert_gate=True,
            mlp_only_layers=[0, 2],
            dense_ffn_hidden_size=72,
        ),
    ):
        with torch.device("meta"):
            model = MoETransformer(cfg)
        counts = count_params(cfg)
        assert sum(p.numel() for p in model.parameters()) == counts["total"]
        assert model.num_params(active=True) == counts["active"]


def test_report_shows_the_family_options():
    import io

    from rich.console import Console

    from moetrain.plan import render

    cfg = dataclasses.replace(
        ModelConfig(),
        qk_norm="per_head",
        shared_expert_intermediate_size=128,
        shared_expert_gate=True,
        mlp_only_layers=[0],
    )
    cfg.moe.normalize_top_k = False
    plan = build_plan(cfg)
    out = io.StringIO()
    render(plan, Console(file=out, width=150))
    text = out.getvalue()
    assert (
        "options: qk_norm=per_head, shared expert F=128 (sigmoid gate), top-k weights not renormalised"
        in text
    )
    assert "MoE layers [1, 2, 3]" in text and "shared_expert" in text
    assert plan["shape"]["moe_layer_ids"] == [1, 2, 3]
    assert plan["total_breakdown"]["shared_expert"] == 3 * (3 * 256 * 128 + 256)


def test_flops_formula():
    cfg = preset("mixtral_8x7b")
    c = count_params(cfg)
    f = flops_per_token(cfg, seq_len=4096)
    matmul = c["active"] - c["active_breakdown"]["embedding"] - c["active_breakdown"]["norms"]
    assert f["matmul_params"] == matmul
    attn = 4 * 32 * 4096 * (4096 + 1) / 2  # causal mean context (T + 1) / 2
    assert f["forward"] == round(2 * matmul + attn)
    assert f["training"] == round(3 * (2 * matmul + attn))
    assert f["inference"] == f["forward"]
    # longer context costs more attention; the matmul part does not move
    g = flops_per_token(cfg, seq_len=32768)
    assert g["forward_matmul"] == f["forward_matmul"] and g["forward_attention"] > f["forward_attention"]


def test_sliding_window_caps_attention_flops():
    cfg = dataclasses.replace(ModelConfig(), sliding_window=64)
    full = flops_per_token(dataclasses.replace(cfg, sliding_window=None), seq_len=512)
    assert flops_per_token(cfg, seq_len=512)["forward_attention"] < full["forward_attention"]


def test_memory_shrinks_with_ep():
    cfg = preset("mixtral_8x7b")
    c = count_params(cfg)
    prev = None
    for ep in (1, 2, 4, 8):
        m = memory_plan(cfg, ep_size=ep, dp_size=8, zero_stage=0, dtype="bf16")
        assert m["per_rank"]["weights"] == (c["non_expert_params"] + c["expert_params"] // ep) * 2
        assert m["total"]["weights"] == c["total"] * 2
        if prev is not None:
            assert m["per_rank"]["total"] < prev
        prev = m["per_rank"]["total"]


def test_zero_stages_partition_state():
    cfg = preset("mixtral_8x7b")
    c = count_params(cfg)
    dense, expert = c["non_expert_params"], c["expert_params"] // 4  # ep=4, dp=8: expert-dp group of 2
    z0, z1, z2 = (
        memory_plan(cfg, ep_size=4, dp_size=8, zero_stage=z, dtype="bf16")["per_rank"] for z in (0, 1, 2)
    )
    assert z0["weights"] == z1["weights"] == z2["weights"]
    assert z0["grads"] == z1["grads"] == (dense + expert) * 2
    assert z1["optimizer"] == dense * 12 // 8 + expert * 12 // 2
    assert z2["grads"] == dense * 2 // 8 + expert * 2 // 2
    assert z0["total"] > z1["total"] > z2["total"]


def test_mixed_precision_bytes():
    cfg = preset("mixtral_small")
    n = count_params(cfg)["total"]
    fp32 = memory_plan(cfg, dtype="fp32")["total"]
    bf16 = memory_plan(cfg, dtype="bf16")["total"]
    assert fp32["weights"] == 4 * n and fp32["optimizer"] == 8 * n
    assert bf16["weights"] == 2 * n and bf16["optimizer"] == 12 * n  # fp32 master + 2 fp32 moments
    assert fp32["total"] == bf16["total"] == 16 * n


def test_bad_layouts_raise_one_line_errors():
    cfg = preset("mixtral_8x7b")
    with pytest.raises(ConfigError, match=r"parallel\.ep_size=3 .*must divide model\.num_experts=8"):
        memory_plan(cfg, ep_size=3, dp_size=3)
    with pytest.raises(ConfigError, match=r"plan\.dp_size=4"):
        build_plan(cfg, ep_size=8, dp_size=4)
    with pytest.raises(ConfigError, match=r"parallel\.ep_size=2"):
        build_plan(preset("dense_small"), ep_size=2)


def test_all_to_all_volume():
    cfg = preset("mixtral_8x7b")
    assert all_to_all_volume(cfg, ep_size=1)["per_token_per_layer"]["forward"] == 0
    a = all_to_all_volume(cfg, ep_size=8, dtype="bf16")
    assert a["per_token_per_layer"]["forward"] == 2 * 2 * 4096 * 2 * 7 / 8
    assert a["per_token_per_layer"]["training"] == 2 * a["per_token_per_layer"]["forward"]
    assert a["per_token"]["forward"] == 32 * a["per_token_per_layer"]["forward"]
    assert (
        all_to_all_volume(cfg, ep_size=8, dtype="fp32")["per_token"]["forward"]
        == 2 * a["per_token"]["forward"]
    )


def test_dense_equivalent_side_by_side():
    p = build_plan(preset("mixtral_8x7b"))
    d = p["dense_equivalent"]
    assert d["ffn_hidden_size"] == 2 * 14336
    assert d["total_params"] == p["active_params"] - p["active_breakdown"]["router"]
    assert d["flops_per_token"]["training"] == pytest.approx(p["flops_per_token"]["training"], rel=1e-3)
    assert p["total_over_active"] == pytest.approx(3.63, abs=0.01)
    assert p["memory"]["inference_weights_bytes"]["bf16"] / d["weights_bytes"]["bf16"] == pytest.approx(
        p["total_params"] / d["total_params"]
    )


def test_plan_summary_lines():
    lines = plan_summary(
        preset("mixtral_8x7b"), ep_size=8, dp_size=8, zero_stage=1, dtype="bf16", seq_len=4096
    )
    assert 2 <= len(lines) <= 4
    assert all(isinstance(s, str) and len(s) < 200 for s in lines)
    text = "\n".join(lines)
    assert "46.70B total" in text and "12.88B active" in text and "3.63x" in text
    assert "ep=8" in text and "ZeRO-1" in text
    assert len(plan_summary(preset("mixtral_tiny"))) in (2, 3, 4)  # defaults work


def test_cli_json():
    r = run_plan("model=mixtral_8x7b", "plan.format=json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)  # one JSON object alone on stdout
    for key in (
        "total_params",
        "active_params",
        "active_breakdown",
        "total_breakdown",
        "flops_per_token",
        "memory",
        "dense_equivalent",
        "all_to_all",
    ):
        assert key in d
    assert isinstance(d["total_params"], int) and isinstance(d["active_params"], int)
    assert d["total_params"] == pytest.approx(46.7e9, rel=0.005)
    assert d["active_params"] == pytest.approx(12.9e9, rel=0.005)


def test_cli_ep_and_dp_overrides():
    r = run_plan(
        "model=olmoe_1b_7b",
        "parallel.ep_size=8",
        "plan.dp_size=16",
        "parallel.zero_stage=2",
        "plan.format=json",
    )
    assert r.returncode == 0, r.stderr
    lay = json.loads(r.stdout)["memory"]["layout"]
    assert lay == {
        "world_size": 16,
        "dp_size": 16,
        "ep_size": 8,
        "expert_dp_size": 2,
        "experts_per_rank": 8,
        "zero_stage": 2,
    }


def test_cli_bad_ep_size_is_a_one_line_error():
    r = run_plan("model=mixtral_8x7b", "parallel.ep_size=3")
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "parallel.ep_size=3" in lines[0]


def test_cli_table_and_no_litter(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "moetrain.plan", "model=mixtral_small"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    for word in ("Parameters", "FLOPs per token", "Training memory", "dense equivalent", "all-to-all"):
        assert word in r.stdout
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log files


def test_cli_non_integer_ep_size_is_a_one_line_error_naming_the_field():
    for arg, field in (
        ("parallel.ep_size=two", "parallel.ep_size='two'"),
        ("plan.dp_size=two", "plan.dp_size"),
    ):
        r = run_plan("model=mixtral_8x7b", arg)
        assert r.returncode == 2 and r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], r.stderr


GiB = 2**30


def test_memory_check_names_estimate_machine_and_fixes():
    with pytest.raises(ConfigError) as err:
        check_memory_fits(
            preset("mixtral_8x7b"),
            ep_size=1,
            world_size=1,
            zero_stage=0,
            dtype="fp32",
            available=64 * GiB,
            machine="this machine has 64.00 GiB of memory available",
        )
    msg = str(err.value)
    assert "\n" not in msg
    # 46.7 B params x (4 + 4 + 8) bytes
    assert "needs about 695.93 GiB per process" in msg and "64.00 GiB" in msg
    for fix in ("model=mixtral_small", "parallel.ep_size=N", "parallel.check_memory=false"):
        assert fix in msg


def test_memory_check_passes_what_fits_and_counts_the_layout():
    tiny = preset("mixtral_tiny")
    check_memory_fits(tiny, ep_size=1, world_size=1, zero_stage=0, dtype="fp32", available=GiB, machine="m")
    big = preset("mixtral_8x7b")
    per_rank = memory_plan(big, ep_size=8, dp_size=8, zero_stage=1, dtype="bf16")["per_rank"]["total"]
    kwargs = dict(ep_size=8, world_size=8, zero_stage=1, dtype="bf16", machine="m")
    check_memory_fits(big, available=per_rank, **kwargs)
    with pytest.raises(ConfigError, match="ep_size=8, 8 processes, ZeRO-1"):
        check_memory_fits(big, available=per_rank - 1, **kwargs)


def test_machine_memory_is_known_here():
    available = host_available_memory()
    assert available is not None and available > 0
    share, text = machine_memory(0, 2)
    assert share > 0
    import torch

    if not torch.cuda.is_available():  # two processes share the host
        assert "for each of its 2 processes" in text and share < available


@pytest.mark.parametrize("experiment", ["mixtral_tiny", "mixtral_small", "dense_small"])
def test_plan_of_an_experiment_counts_what_training_builds(experiment):
    from moetrain.config import train_config_from_dict
    from moetrain.model import MoETransformer

    r = run_plan(f"+experiment={experiment}", "plan.format=json")
    assert r.returncode == 0, r.stderr
    planned = json.loads(r.stdout)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        train_cfg = compose(config_name="train", overrides=[f"+experiment={experiment}"])
    cfg = train_config_from_dict(OmegaConf.to_container(train_cfg, resolve=True))
    import torch

    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    assert planned["total_params"] == sum(p.numel() for p in model.parameters())
    assert planned["shape"]["vocab_size"] == cfg.data.vocab_size
    assert planned["vocab_source"] == f"data.vocab_size (data={cfg.data.name})"


def test_table_says_where_the_vocab_comes_from():
    r = run_plan("model=mixtral_tiny")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "V=8192 comes from data.vocab_size (data=builtin)" in text and "+experiment=NAME" in text
    r = run_plan("model=mixtral_8x7b")
    assert "comes from" not in r.stdout  # a published shape has its own vocab


# The 2025 families, each against its publisher's own convention for active parameters: gpt-oss leaves
# out the input embedding (its model card: 116.83B / 5.13B, 20.91B / 3.61B), GLM-4.5 both embeddings
# (106B / 12B); DeepSeek-V3 counts both (671B / 37B, its MTP module aside). Totals to 1%, actives to 3%.
PUBLISHED_2025 = {
    "deepseek_v3": (671e9, 37e9, "active"),
    "gpt_oss_120b": (116.8e9, 5.1e9, "active_without_input_embedding"),
    "gpt_oss_20b": (20.9e9, 3.6e9, "active_without_input_embedding"),
    "glm4_5_air": (106e9, 12e9, "active_without_embeddings"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_2025))
def test_published_parameter_counts_2025(name):
    total, active, convention = PUBLISHED_2025[name]
    counts = count_params(preset(name))
    assert counts["total"] == pytest.approx(total, rel=0.01)
    assert counts[convention] == pytest.approx(active, rel=0.03)
    if convention != "active":  # negative control: the Mixtral convention misses gpt-oss / GLM's figures
        assert counts["active"] != pytest.approx(active, rel=0.03)


@pytest.mark.parametrize(
    "options",
    [
        {"attention_bias": True, "attention_out_bias": True, "attention_sinks": True,
         "moe": {"router_bias": True, "expert_proj_bias": True, "expert_activation": "clamped_swiglu"}},
        {"mlp_only_layers": [0], "shared_expert_intermediate_size": 48, "partial_rotary_factor": 0.5,
         "qk_norm": "per_head", "attention_bias": True, "num_experts": 8,
         "moe": {"score_function": "sigmoid", "selection_bias": True, "n_group": 4, "topk_group": 2}},
        {"mlp_only_layers": [0], "shared_expert_intermediate_size": 48, "num_experts": 8,
         "mla": {"kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 12,
                 "v_head_dim": 10},
         "moe": {"score_function": "sigmoid", "selection_bias": True, "n_group": 4, "topk_group": 2}},
    ],
    ids=["gpt_oss", "glm4_moe", "deepseek_v3"],
)  # fmt: skip
def test_counts_equal_the_built_model_2025(options):
    from moetrain.config import MLAConfig, MoEConfig
    from moetrain.model import MoETransformer
    from moetrain.testing import tiny_model_config

    options = dict(options)
    sub = {"moe": MoEConfig(**options.get("moe", {})), "mla": MLAConfig(**options.get("mla", {}))}
    cfg = tiny_model_config(head_dim=16, **{**options, **sub})
    model = MoETransformer(cfg)
    assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
    active = count_params(cfg)["active"]
    per_expert = sum(p[0].numel() for p in model.moe_layers[0].experts.parameters())
    assert active == count_params(cfg)["total"] - len(model.moe_layers) * per_expert * (
        cfg.num_experts - cfg.top_k
    )
