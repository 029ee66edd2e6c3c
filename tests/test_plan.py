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
    fitting_settings,
    flops_per_token,
    fmt_bytes,
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
    "qwen3_30b_a3b": (30.5e9, 3.3e9),  # model card; "3.3B activated" is given to two digits only
}
TWO_DIGITS = {"qwen3_30b_a3b"}  # exact count 3.353 B active (the card rounds it to 3.3 B): 2%


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    total, active = PUBLISHED[name]
    counts = count_params(preset(name))
    assert counts["total"] == pytest.approx(total, rel=0.005)
    assert counts["active"] == pytest.approx(active, rel=0.02 if name in TWO_DIGITS else 0.005)


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
    assert {
        k: lay[k]
        for k in ("world_size", "dp_size", "ep_size", "expert_dp_size", "experts_per_rank", "zero_stage")
    } == {
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
            ep_size=8,
            world_size=8,
            zero_stage=2,
            dtype="bf16",
            available=80 * GiB,
            machine="GPU 0 has 80.00 GiB free",
            seq_len=4096,
            activation_checkpointing=True,
            host_is_device=False,
        )
    msg = str(err.value)
    assert "\n" not in msg
    mem = memory_plan(
        preset("mixtral_8x7b"),
        ep_size=8,
        dp_size=8,
        zero_stage=2,
        seq_len=4096,
        activation_checkpointing=True,
    )
    assert f"needs about {fmt_bytes(mem['per_rank']['device_total'])} per process" in msg
    for part in (
        "80.00 GiB free",
        "parallel.offload_optimizer=true",
        "plan.dp_size=16",
        "check_memory=false",
    ):
        assert part in msg, (part, msg)


def test_memory_check_passes_what_fits_and_counts_the_layout():
    tiny = preset("mixtral_tiny")
    check_memory_fits(tiny, ep_size=1, world_size=1, zero_stage=0, dtype="fp32", available=GiB, machine="m")
    big = preset("mixtral_8x7b")
    per_rank = memory_plan(big, ep_size=8, dp_size=8, zero_stage=1, dtype="bf16", seq_len=4096)["per_rank"][
        "device_total"
    ]
    kwargs = dict(ep_size=8, world_size=8, zero_stage=1, dtype="bf16", machine="m", seq_len=4096)
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


def test_report_names_the_2025_family_options():
    from moetrain.plan.report import _family_options

    out = run_plan("model=deepseek_v3", "plan.format=json")
    assert out.returncode == 0, out.stderr
    shape = json.loads(out.stdout)["shape"]
    assert _family_options(shape) == [
        "MLA (kv latent 512, q latent 1536)", "RoPE yarn x40", "sigmoid router", "groups 4 of 8",
        "routed weights x2.5",
    ]  # fmt: skip
    gpt_oss = {**shape, "mla": None, "rope_scaling": None, "score_function": "softmax", "n_group": 1,
               "routed_scaling_factor": 1.0, "attention_sinks": True, "sliding_window": 128,
               "layer_types": ["sliding_attention", "full_attention"], "expert_proj_bias": True,
               "expert_activation": "clamped_swiglu"}  # fmt: skip
    assert _family_options(gpt_oss) == [
        "attention sinks", "window 128 on 1/2 layers", "expert biases", "clamped_swiglu"
    ]  # fmt: skip
    assert (
        _family_options(json.loads(run_plan("model=mixtral_8x7b", "plan.format=json").stdout)["shape"]) == []
    )


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


# ---- issue 33: the fit verdict ------------------------------------------------------------------

MIXTRAL_NODE = dict(ep_size=8, dp_size=8, dtype="bf16", micro_batch_size=1, seq_len=4096)


def test_mixtral_8x7b_on_one_node_fits_only_with_offload():
    cfg = preset("mixtral_8x7b")
    zero2 = memory_plan(cfg, zero_stage=2, activation_checkpointing=True, **MIXTRAL_NODE)
    assert not zero2["fits"] and zero2["per_rank"]["device_total"] > 80 * GiB
    # ZeRO-3 alone cannot: ep=8 leaves one replica of each expert (nothing to partition them over)
    zero3 = memory_plan(cfg, zero_stage=3, activation_checkpointing=True, **MIXTRAL_NODE)
    assert not zero3["fits"]
    for stage in (2, 3):
        off = memory_plan(
            cfg, zero_stage=stage, offload_optimizer=True, activation_checkpointing=True, **MIXTRAL_NODE
        )
        r = off["per_rank"]
        assert off["fits"] and r["device_total"] <= 80 * GiB
        assert r["host_total"] == r["optimizer"] + r["fp32_grad_step"] > 0
    # the parts add up: state + buffers + the larger of activations and the fp32 step gradients
    r = zero2["per_rank"]
    assert r["device_total"] == (
        r["weights"] + r["grads"] + r["optimizer"] + r["buffers"] + max(r["activations"], r["fp32_grad_step"])
    )


def test_zero3_partitions_weights_experts_over_their_group():
    cfg = preset("mixtral_8x7b")
    counts = count_params(cfg)
    r = memory_plan(cfg, ep_size=2, dp_size=8, zero_stage=3)["per_rank"]
    dense, expert = counts["non_expert_params"], counts["expert_params"]
    assert r["weights"] == pytest.approx(2 * (dense / 8 + expert / 2 / 4), rel=1e-6)
    assert r["optimizer"] == pytest.approx(12 * (dense / 8 + expert / 2 / 4), rel=1e-6)


def test_fitting_settings_are_computed_and_each_fits():
    cfg = preset("mixtral_small")
    settings = dict(
        ep_size=1,
        dp_size=1,
        zero_stage=0,
        offload_optimizer=False,
        micro_batch_size=64,
        seq_len=256,
        activation_checkpointing=False,
    )
    need = memory_plan(cfg, dtype="fp32", **settings)["per_rank"]["device_total"]
    budget = int(need * 0.7)
    options = fitting_settings(cfg, settings, "fp32", budget)
    changes = [o["change"] for o in options]
    assert {"activation_checkpointing": True} in changes
    assert any(list(c) == ["micro_batch_size"] and c["micro_batch_size"] < 64 for c in changes)
    for o in options:
        got = memory_plan(cfg, dtype="fp32", **{**settings, **o["change"]})["per_rank"]["device_total"]
        assert got == o["device_total"] <= budget
    # negative control: with a budget nothing reaches, nothing is proposed
    assert fitting_settings(cfg, settings, "fp32", 1) == []


def test_activation_formula_matches_what_autograd_stores():
    """plan's stored activations vs the bytes autograd saves in a real forward (distinct storages,
    parameters excluded), fp32 and bf16; a formula without the MoE's gathered copies misses."""
    import torch

    from moetrain.model import MoETransformer
    from moetrain.plan import activation_memory

    cfg = model_config_from_dict(
        {
            "vocab_size": 512,
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "ffn_hidden_size": 128,
            "max_seq_len": 128,
        }
    )
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = MoETransformer(cfg).to(torch_dtype).train()
        ids = torch.randint(0, cfg.vocab_size, (4, 128))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t, seen=seen, params=params):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, labels_BT=ids)
        out.loss.backward()
        measured = sum(seen.values())
        plan = activation_memory(cfg, micro_batch_size=4, seq_len=128, dtype=dtype)["stored"]
        assert plan == pytest.approx(measured, rel=0.06), dtype
        a = 4 if dtype == "fp32" else 2
        copies = 2 * a * 4 * 128 * cfg.top_k * cfg.hidden_size * cfg.num_layers
        assert abs(plan - copies - measured) > 0.06 * measured  # negative control


def test_cli_json_has_the_fit_verdict():
    out = run_plan(
        "model=mixtral_8x7b",
        "parallel.ep_size=8",
        "plan.dp_size=8",
        "parallel.dtype=bf16",
        "optim.micro_batch_size=1",
        "plan.seq_len=4096",
        "parallel.activation_checkpointing=true",
        "parallel.zero_stage=3",
        "parallel.offload_optimizer=true",
        "plan.format=json",
    )
    assert out.returncode == 0, out.stderr
    mem = json.loads(out.stdout)["memory"]["bf16"]
    for key in ("weights", "grads", "optimizer", "activations", "device_total", "host_total"):
        assert isinstance(mem["per_rank"][key], int), key
    assert mem["fits"] is True and mem["per_rank"]["device_total"] <= 80 * GiB
    bad = run_plan("model=mixtral_tiny", "plan.device_memory_gib=-1")
    assert bad.returncode == 2 and "plan.device_memory_gib" in bad.stderr


def test_training_takes_what_plan_plans_and_refuses_offload_without_zero():
    from moetrain.config import train_config_from_dict

    cfg = train_config_from_dict({"parallel": {"zero_stage": 3, "offload_optimizer": True}})
    assert (cfg.parallel.zero_stage, cfg.parallel.offload_optimizer) == (3, True)
    with pytest.raises(ConfigError, match="parallel.offload_optimizer=True .*zero_stage=1, 2 or 3") as err:
        train_config_from_dict({"parallel": {"offload_optimizer": True}})
    assert "\n" not in str(err.value)


def test_one_dtype_rule_for_plan_and_trainer(monkeypatch):
    import torch

    from moetrain.plan import resolve_dtype
    from moetrain.trainer.engine import resolve_dtype as engine_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expect in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
        assert resolve_dtype("auto") == expect
        assert engine_dtype("auto") == {"fp32": torch.float32, "bf16": torch.bfloat16}[expect]


def test_launch_check_counts_activations():
    tiny = preset("mixtral_tiny")
    need = memory_plan(tiny, dtype="fp32", micro_batch_size=1, seq_len=8)["per_rank"]["device_total"]
    kwargs = dict(ep_size=1, world_size=1, zero_stage=0, dtype="fp32", machine="m", available=2 * need)
    check_memory_fits(tiny, micro_batch_size=1, seq_len=8, **kwargs)
    with pytest.raises(ConfigError, match="activations"):
        check_memory_fits(tiny, micro_batch_size=512, seq_len=tiny.max_seq_len, **kwargs)


# ---- issue 38: the step-time model ---------------------------------------------------------------


def test_step_time_parts_and_placement():
    from moetrain.plan.clusters import load_cluster
    from moetrain.plan.step_time import step_time

    cfg = preset("mixtral_8x7b")
    h100 = load_cluster("h100_nvlink_ib400")
    kw = dict(dtype="bf16", micro_batch_size=1, seq_len=4096, zero_stage=1, activation_checkpointing=True)
    one = step_time(cfg, h100, ep_size=1, dp_size=16, **kw)
    assert one["all_to_all_s"] == 0
    intra = step_time(cfg, h100, ep_size=8, dp_size=16, **kw)
    assert intra["all_to_all_s"] > 0 and intra["total_s"] == pytest.approx(
        intra["compute_s"] + intra["all_to_all_s"] + intra["grad_reduce_s"] + intra["optimizer_s"]
    )
    assert intra["tokens_per_s"] == pytest.approx(16 * 4096 / intra["total_s"])
    assert 0 < intra["mfu"] < 0.7
    # an ep group across two nodes goes over the network: slower all-to-all than inside a node
    cross = step_time(preset("qwen3_30b_a3b"), h100, ep_size=16, dp_size=16, **kw)
    inside = step_time(preset("qwen3_30b_a3b"), h100, ep_size=8, dp_size=16, **kw)
    assert cross["all_to_all_s"] > 5 * inside["all_to_all_s"]
    # small expert GEMMs run below peak: more experts per token-count lowers the efficiency
    few_rows = step_time(cfg, h100, ep_size=1, dp_size=8, **{**kw, "seq_len": 256})
    assert few_rows["expert_gemm_efficiency"] < one["expert_gemm_efficiency"]


def test_cluster_file_and_bad_names(tmp_path):
    from moetrain.plan.clusters import PRESETS, load_cluster

    path = tmp_path / "c.json"
    path.write_text(json.dumps(PRESETS["a100_nvlink_ib200"]))
    assert load_cluster(str(path))["matmul_flops"]["bf16"] == 312e12
    with pytest.raises(ConfigError, match="plan.cluster='nope' is invalid"):
        load_cluster("nope")
    path.write_text(json.dumps({"matmul_flops": {"bf16": 1.0}}))
    with pytest.raises(ConfigError, match="missing"):
        load_cluster(str(path))
    out = run_plan("model=mixtral_small", "plan.cluster=h100_nvlink_ib400", "plan.format=json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)["step_time"]
    for key in (
        "compute_s",
        "all_to_all_s",
        "grad_reduce_s",
        "optimizer_s",
        "total_s",
        "tokens_per_s",
        "mfu",
    ):
        assert st[key] >= 0, key


def test_calibration_fit_recovers_a_known_curve():
    from moetrain.plan.calibrate import fit_efficiency

    points = {m: 1e12 * m / (m + 100) for m in (32, 128, 512, 100000)}
    peak, half = fit_efficiency(points)
    assert peak == pytest.approx(1e12, rel=0.01) and half == pytest.approx(100, rel=0.02)


def test_sweep_over_ep_size():
    out = run_plan(
        "model=mixtral_8x7b",
        "plan.dp_size=16",
        "optim.micro_batch_size=1",
        "plan.seq_len=4096",
        "plan.cluster=h100_nvlink_ib400",
        "plan.sweep=ep_size",
        "plan.format=json",
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["sweep"]
    assert [r["ep_size"] for r in rows] == [1, 2, 4, 8]
    assert rows[0]["all_to_all_s"] == 0 < rows[-1]["all_to_all_s"]
    assert rows[-1]["device_total"] < rows[0]["device_total"]
    bad = run_plan("model=mixtral_tiny", "plan.sweep=ep_size")
    assert bad.returncode == 2 and "plan.cluster" in bad.stderr


def test_grad_reduce_dtype_halves_the_reduced_bytes():
    from moetrain.plan.clusters import load_cluster
    from moetrain.plan.step_time import step_time

    cfg = preset("mixtral_8x7b")
    no_latency = {**load_cluster("h100_nvlink_ib400"), "intra_node_latency": 0.0, "inter_node_latency": 0.0}
    kw = dict(dtype="bf16", micro_batch_size=1, seq_len=4096, zero_stage=1, ep_size=8, dp_size=16)
    fp32 = step_time(cfg, no_latency, **kw)
    bf16 = step_time(cfg, no_latency, grad_reduce_dtype="bf16", **kw)
    assert fp32["grad_reduce_s"] > 0
    assert bf16["grad_reduce_s"] == pytest.approx(fp32["grad_reduce_s"] / 2, rel=1e-12)
    assert bf16["compute_s"] == fp32["compute_s"] and bf16["total_s"] < fp32["total_s"]


def test_overlap_comm_hides_the_reduction_behind_the_backward_on_a_gpu_only():
    from moetrain.plan.clusters import load_cluster
    from moetrain.plan.step_time import step_time

    cfg = preset("mixtral_8x7b")
    h100 = load_cluster("h100_nvlink_ib400")
    kw = dict(dtype="bf16", micro_batch_size=1, seq_len=4096, ep_size=8, dp_size=16)
    off = step_time(cfg, h100, zero_stage=2, **kw)
    on = step_time(cfg, h100, zero_stage=2, overlap_comm=True, **kw)
    assert off["overlapped_s"] == 0
    assert 0 < on["overlapped_s"] <= on["grad_reduce_s"]
    assert on["total_s"] == pytest.approx(off["total_s"] - on["overlapped_s"])
    # DeepSpeed's default: on at ZeRO-3 only; never at ZeRO-0
    assert step_time(cfg, h100, zero_stage=3, **kw)["overlapped_s"] > 0
    assert step_time(cfg, h100, zero_stage=0, overlap_comm=True, **kw)["overlapped_s"] == 0
    # a CPU host has no communication streams: DeepSpeed reduces in line there
    cpu = {**h100, "shared_compute": True}
    assert step_time(cfg, cpu, zero_stage=2, overlap_comm=True, **kw)["overlapped_s"] == 0


def test_a2a_chunks_hide_part_of_the_exchange_on_a_gpu_and_cost_latency_everywhere():
    from moetrain.plan.clusters import load_cluster
    from moetrain.plan.step_time import step_time

    cfg = preset("mixtral_8x7b")
    h100 = load_cluster("h100_nvlink_ib400")
    # ep 16 over 2 nodes: the exchange crosses InfiniBand, about half the expert GEMMs' time
    kw = dict(dtype="bf16", micro_batch_size=1, seq_len=4096, zero_stage=1, ep_size=16, dp_size=16)
    one = step_time(cfg, h100, **kw)
    four = step_time(cfg, h100, a2a_chunks=4, **kw)
    experts = four["compute_breakdown_s"]["experts"]
    assert four["overlapped_s"] == pytest.approx(min(four["all_to_all_s"], experts) * (1 - 1 / 4))
    # three more latencies per exchange; smaller expert GEMMs run a little less efficiently
    exchanges = 32 * 2 * 2  # 32 MoE layers x (dispatch + combine) x (forward + backward)
    extra = exchanges * 3 * (16 - 1) * h100["inter_node_latency"]  # 3 more chunks, 15 peers each
    assert four["all_to_all_s"] - one["all_to_all_s"] == pytest.approx(extra)
    assert four["expert_gemm_efficiency"] < one["expert_gemm_efficiency"]
    assert four["total_s"] < one["total_s"]  # the hidden exchange outweighs both costs here
    assert set(four) == set(one)  # the JSON keeps its keys
    # ep 1 has no exchange to chunk; a CPU host copies the exchange on its GEMM cores: nothing hidden
    assert step_time(cfg, h100, a2a_chunks=4, **{**kw, "ep_size": 1})["overlapped_s"] == 0
    cpu = step_time(cfg, {**h100, "shared_compute": True}, a2a_chunks=4, **kw)
    assert cpu["overlapped_s"] == 0
    assert cpu["total_s"] > step_time(cfg, {**h100, "shared_compute": True}, **kw)["total_s"]
