"""Tiny configs and models the tests share: the mixtral_tiny run, a small ModelConfig, tiny
transformers models of every family moetrain maps."""

from __future__ import annotations

import os
from typing import Any

from moetrain.testing.process import FAST_OVERRIDES, merge_overrides
from moetrain.testing.runs import TrainRun, cached_run

# ---- the tiny experiment, shared by the trainer and distributed tests ------------------------------
# mixtral_tiny (fixture corpus, no download): 20 steps, micro-batch 4, eval and checkpoint every 10.
# global_batch aux scope makes a multi-process run equal a one-process run with the same global batch.
TINY_OVERRIDES: tuple[str, ...] = (
    "+experiment=mixtral_tiny",
    *FAST_OVERRIDES,
    "model.moe.aux_loss_scope=global_batch",
)


def tiny(*extra: str) -> list[str]:
    """mixtral_tiny overrides (fast, global_batch aux scope) plus ``extra`` (later keys win)."""
    return merge_overrides(TINY_OVERRIDES, extra)


def reference_run() -> TrainRun:
    """The one-process mixtral_tiny reference: 20 steps, global batch 4, W&B offline, a short sample
    at the end. (With one process, aux_loss_scope global_batch and micro_batch are the same.)"""
    return cached_run(
        *tiny("logging.wandb.mode=offline", "trainer.sample_tokens=8"), nproc=1, name="reference"
    )


TINY_MODEL = {
    "vocab_size": 97,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "ffn_hidden_size": 48,
    "num_experts": 4,
    "top_k": 2,
    "max_seq_len": 64,
}


def tiny_model_config(**overrides: Any):
    """A small, validated ``ModelConfig`` (hidden 32, 2 layers, 4 experts, top-2) for unit tests."""
    from moetrain.config import ModelConfig

    cfg = ModelConfig(**{**TINY_MODEL, **overrides})
    cfg.validate()
    return cfg


def ep_train_config(
    ep_size: int,
    *,
    top_k: int = 2,
    aux_loss_scope: str = "global_batch",
    a2a_chunks: int = 1,
    name: str = "ep-test",
):
    """A validated fp32 ``TrainConfig`` for in-process expert-parallel tests: hidden 32, 2 layers, 4
    experts, seq 12, micro-batch 2, aux and z losses on, no warm-up."""
    from moetrain.config import DataConfig, ModelConfig, MoEConfig, OptimConfig, ParallelConfig, TrainConfig

    model = ModelConfig(
        name=name,
        vocab_size=96,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=64,
        num_experts=4,
        top_k=top_k,
        max_seq_len=16,
        moe=MoEConfig(aux_loss_weight=0.1, z_loss_weight=0.01, aux_loss_scope=aux_loss_scope),
    )
    return TrainConfig(
        model=model,
        data=DataConfig(seq_len=12),
        optim=OptimConfig(micro_batch_size=2, warmup_steps=0),
        parallel=ParallelConfig(ep_size=ep_size, dtype="fp32", a2a_chunks=a2a_chunks),
    ).validate()


# Tiny transformers models of every family moetrain maps (moetrain/hf/): vocab 512 (the fixture
# BPE's size), hidden 32, 2 layers, 4 experts top-2. Each family's own options are switched on.
_HF_TINY = {
    "vocab_size": 512,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
# YaRN as gpt-oss and DeepSeek-V3 ship it (model/rope.py), scaled down: 16 original positions x 4.
_TINY_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
              "original_max_position_embeddings": 16}  # fmt: skip
HF_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"intermediate_size": 48, "num_local_experts": 4,
                                                        "num_experts_per_tok": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"intermediate_size": 48}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"intermediate_size": 48, "num_experts": 4,
                                                  "num_experts_per_tok": 2, "norm_topk_prob": False}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_hidden_layers": 3, "intermediate_size": 64, "moe_intermediate_size": 48,
        "shared_expert_intermediate_size": 40, "num_experts": 4, "num_experts_per_tok": 2,
        "mlp_only_layers": [1], "qkv_bias": True, "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_hidden_layers": 3, "head_dim": 16, "intermediate_size": 64, "moe_intermediate_size": 48,
        "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 2, "norm_topk_prob": True}),
    # DeepSeek-V3 router (moetrain/hf/deepseek.py): 8 experts in 4 groups, 2 groups kept, top-2, scaled
    # weights, one shared expert, first layer dense; GQA with per-head QK-norm, q/k/v bias, half RoPE.
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", {
        "num_hidden_layers": 3, "head_dim": 16, "intermediate_size": 64, "moe_intermediate_size": 24,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "norm_topk_prob": True, "use_qk_norm": True, "attention_bias": True, "num_nextn_predict_layers": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    # DeepSeek-V3: the same router, multi-head latent attention with a q latent and interleaved rotary dims,
    # YaRN with mscale_all_dim (the softmax scale grows too).
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        "num_hidden_layers": 3, "num_key_value_heads": 4, "intermediate_size": 64, "moe_intermediate_size": 24,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
        "q_lora_rank": 24, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 12, "v_head_dim": 10,
        "rope_interleave": True, "num_nextn_predict_layers": 0,
        "rope_parameters": {**_TINY_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}),  # as the real model
    # gpt-oss (moetrain/hf/gpt_oss.py): sinks, sliding / full layers (window 4 < the tests' 16 tokens),
    # biases everywhere, clamped SwiGLU with interleaved gate / up; YaRN without truncation, as released.
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {
        "num_hidden_layers": 3, "head_dim": 16, "intermediate_size": 32, "num_local_experts": 4,
        "num_experts_per_tok": 2, "sliding_window": 4, "swiglu_limit": 0.1,  # small: the clamps act
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {**_TINY_YARN, "truncate": False}}),
    # dense sources of sparse upcycling
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"intermediate_size": 48}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "intermediate_size": 48}),
}  # fmt: skip


def tiny_hf_model(family: str, folder: str | os.PathLike | None = None, seed: int = 0, **overrides: Any):
    """A tiny random transformers model of ``family`` (a key of ``HF_FAMILIES``), eval mode, fp32, with
    non-trivial norm weights and biases (so a swapped norm or a dropped bias shows). With ``folder``
    it is also saved there (``save_pretrained``, safetensors; ``max_shard_size`` in ``overrides`` is
    passed on, to write sharded checkpoints)."""
    import torch
    import transformers

    cfg_cls, model_cls, extra = HF_FAMILIES[family]
    shard = overrides.pop("max_shard_size", None)
    hf_cfg = getattr(transformers, cfg_cls)(**{**_HF_TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".bias", "_bias")):  # gpt-oss's experts: gate_up_proj_bias, down_proj_bias
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # the selection bias (DeepSeek-V3 router)
                b.normal_(0.0, 0.05)
    if folder is not None:
        kw = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(str(folder), safe_serialization=True, **kw)
    return model
