"""model.*: the decoder's shape and options (ModelConfig and its moe / mla / lora sections).

Fields marked ``SHAPE`` decide which tensors exist and their sizes (a resume checks them against the
checkpoint); fields marked ``ARCH`` are what a pretrained model's config decides (moetrain/pretrained.py
copies them, plan reports them). ``shape_fields`` / ``arch_fields`` read the marks: no hand-kept lists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moetrain.config.errors import _require

MOE_BACKENDS = ("auto", "torch", "megablocks")
EXPERT_IMPLS = ("auto", "grouped_mm", "loop")
AUX_LOSS_TYPES = ("switch", "mixtral")
AUX_LOSS_SCOPES = ("micro_batch", "global_batch")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
# Normalisation of queries and keys before RoPE: none (Mixtral, Mistral, Qwen2-MoE), one RMSNorm over
# the whole q / k projection (OLMoE), or one per head over head_dim (Qwen3, Qwen3-MoE).
QK_NORMS = ("none", "full", "per_head")

# Field marks (dataclass metadata), read by shape_fields / arch_fields.
SHAPE = {
    "shape": True
}  # decides which tensors exist or their sizes: a checkpoint of another value cannot resume
ARCH = {"arch": True}  # the function a pretrained model's config fixes (copied from it, reported by plan)
SHAPE_ARCH = {"shape": True, "arch": True}


def _marked(cls: type, mark: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(mark))


def shape_fields(cls: type | None = None) -> tuple[str, ...]:
    """Fields of ``cls`` (default ModelConfig; MoEConfig for model.moe) marked SHAPE."""
    return _marked(cls or ModelConfig, "shape")


def arch_fields(cls: type | None = None) -> tuple[str, ...]:
    """Fields of ``cls`` (default ModelConfig; MoEConfig for model.moe) marked ARCH."""
    return _marked(cls or ModelConfig, "arch")


@dataclass
class MoEConfig:
    backend: str = "auto"  # auto: megablocks when CUDA + megablocks are present, else torch
    expert_impl: str = "auto"  # torch backend kernel: grouped_mm where torch has it, else a loop
    capacity_factor: float | None = None  # None = dropless
    aux_loss_weight: float = 0.01
    aux_loss_type: str = "switch"  # switch = E * sum(f_i * P_i); mixtral = transformers' formula
    aux_loss_scope: str = "micro_batch"
    z_loss_weight: float = 0.001
    normalize_top_k: bool = field(
        default=True, metadata=ARCH
    )  # Mixtral renormalises the top-k softmax weights
    jitter_eps: float = 0.0  # multiplicative input jitter during training (Switch)
    score_function: str = field(
        default="softmax", metadata=ARCH
    )  # softmax (Mixtral) | sigmoid (DeepSeek-V3; top-k renormalised)
    # Aux-loss-free balancing (DeepSeek-V3): per-expert selection bias b += u * sign(mean - load)
    # after every optimizer step, from the step's global loads. 0 = off (no bias in the model).
    bias_update_rate: float = 0.0
    seq_aux_loss_weight: float = 0.0  # DeepSeek-V3 sequence-wise balance loss weight (alpha); 0 = off
    # Group-limited routing (DeepSeek-V3, GLM-4.5): experts in n_group groups, each token chooses within
    # its topk_group best groups (by the sum of each group's two best scores). 1 / 1 = off.
    n_group: int = field(default=1, metadata=ARCH)
    topk_group: int = field(default=1, metadata=ARCH)
    routed_scaling_factor: float = field(
        default=1.0, metadata=ARCH
    )  # multiplies the combine weights (DeepSeek-V3: 2.5)
    # Hold the expert-selection bias even with bias_update_rate=0 (a checkpoint's e_score_correction_bias,
    # kept as it is while fine-tuning); bias_update_rate > 0 implies it.
    selection_bias: bool = field(default=False, metadata=SHAPE_ARCH)
    router_bias: bool = field(default=False, metadata=SHAPE_ARCH)  # a bias on the router's gate (gpt-oss)
    expert_proj_bias: bool = field(
        default=False, metadata=SHAPE_ARCH
    )  # biases on the experts' gate / up and down projections (gpt-oss)
    expert_activation: str = field(
        default="swiglu", metadata=ARCH
    )  # swiglu | clamped_swiglu (gpt-oss: swiglu_alpha, swiglu_limit)
    swiglu_alpha: float = field(default=1.702, metadata=ARCH)
    swiglu_limit: float = field(default=7.0, metadata=ARCH)

    def validate(self, prefix: str = "model.moe") -> None:
        _require(self.backend in MOE_BACKENDS, f"{prefix}.backend", self.backend, f"one of {MOE_BACKENDS}")
        _require(
            self.expert_impl in EXPERT_IMPLS,
            f"{prefix}.expert_impl",
            self.expert_impl,
            f"one of {EXPERT_IMPLS}",
        )
        _require(
            self.capacity_factor is None or self.capacity_factor > 0,
            f"{prefix}.capacity_factor",
            self.capacity_factor,
            "null (dropless) or a positive number",
        )
        _require(self.aux_loss_weight >= 0, f"{prefix}.aux_loss_weight", self.aux_loss_weight, "must be >= 0")
        _require(self.z_loss_weight >= 0, f"{prefix}.z_loss_weight", self.z_loss_weight, "must be >= 0")
        _require(
            self.aux_loss_type in AUX_LOSS_TYPES,
            f"{prefix}.aux_loss_type",
            self.aux_loss_type,
            f"one of {AUX_LOSS_TYPES}",
        )
        _require(
            self.aux_loss_scope in AUX_LOSS_SCOPES,
            f"{prefix}.aux_loss_scope",
            self.aux_loss_scope,
            f"one of {AUX_LOSS_SCOPES}",
        )
        _require(self.jitter_eps >= 0, f"{prefix}.jitter_eps", self.jitter_eps, "must be >= 0")
        _require(
            self.score_function in SCORE_FUNCTIONS,
            f"{prefix}.score_function",
            self.score_function,
            f"one of {SCORE_FUNCTIONS}",
        )
        _require(
            self.bias_update_rate >= 0,
            f"{prefix}.bias_update_rate",
            self.bias_update_rate,
            "must be >= 0 (0 = no expert bias)",
        )
        _require(
            self.seq_aux_loss_weight >= 0,
            f"{prefix}.seq_aux_loss_weight",
            self.seq_aux_loss_weight,
            "must be >= 0",
        )
        _require(self.n_group >= 1, f"{prefix}.n_group", self.n_group, "must be >= 1 (1 = no groups)")
        _require(
            1 <= self.topk_group <= self.n_group,
            f"{prefix}.topk_group",
            self.topk_group,
            f"must be between 1 and n_group={self.n_group}",
        )
        _require(
            self.routed_scaling_factor > 0,
            f"{prefix}.routed_scaling_factor",
            self.routed_scaling_factor,
            "must be > 0 (1 = unscaled)",
        )


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, moetrain/model/mla.py); off while kv_lora_rank is 0.
    Checked by moetrain/config/families.py."""

    kv_lora_rank: int = 0  # keys and values from one compressed latent of this size (0: GQA attention)
    q_lora_rank: int | None = None  # queries through a low-rank latent too (None: a full q projection)
    qk_rope_head_dim: int = 64  # the rotated part of each query / key head (one key part shared by all heads)
    qk_nope_head_dim: int = 128  # the unrotated part
    v_head_dim: int = 128
    rope_interleave: bool = False  # the checkpoints' rotary dims in (even, odd) pairs (DeepSeek-V3: true)

    @property
    def enabled(self) -> bool:
        return self.kv_lora_rank > 0


LORA_TARGETS = ("attention", "experts", "shared_expert", "router")


@dataclass
class LoRAConfig:
    """LoRA fine-tuning (moetrain/model/lora.py): the base frozen, adapters trained. rank 0 = off."""

    rank: int = 0
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input only
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])

    def validate(self, prefix: str = "model.lora") -> None:
        _require(
            type(self.rank) is int and self.rank >= 0,
            f"{prefix}.rank",
            self.rank,
            "an integer >= 0 (0 = off)",
        )
        _require(self.alpha > 0, f"{prefix}.alpha", self.alpha, "must be > 0")
        _require(0 <= self.dropout < 1, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _require(
            bool(self.targets) and not bad,
            f"{prefix}.targets",
            list(self.targets),
            f"a non-empty list of {LORA_TARGETS}",
        )


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = field(default=8192, metadata=SHAPE_ARCH)
    hidden_size: int = field(default=256, metadata=SHAPE_ARCH)
    num_layers: int = field(default=4, metadata=SHAPE_ARCH)
    num_heads: int = field(default=8, metadata=SHAPE_ARCH)
    num_kv_heads: int = field(default=2, metadata=SHAPE_ARCH)
    head_dim: int | None = field(default=None, metadata=SHAPE_ARCH)  # None = hidden_size // num_heads
    ffn_hidden_size: int = field(
        default=512, metadata=SHAPE_ARCH
    )  # per expert (and of dense FFN layers unless dense_ffn_hidden_size)
    dense_ffn_hidden_size: int | None = field(default=None, metadata=SHAPE_ARCH)
    num_experts: int = field(default=8, metadata=SHAPE_ARCH)  # 0 = dense model
    top_k: int = field(default=2, metadata=ARCH)
    moe_every: int = field(
        default=1, metadata=SHAPE_ARCH
    )  # layer i is MoE iff num_experts > 0 and (i + 1) % moe_every == 0
    max_seq_len: int = field(default=512, metadata=ARCH)
    rope_theta: float = field(default=10000.0, metadata=ARCH)
    # null = plain RoPE, or {rope_type: linear | dynamic | llama3 | yarn, <its fields>} named as in
    # transformers' rope_parameters (moetrain/model/rope.py lists them).
    rope_scaling: dict[str, Any] | None = field(default=None, metadata=ARCH)
    # RoPE on the first partial_rotary_factor * head_dim dims of each head, the rest unrotated (GLM-4.5: 0.5).
    partial_rotary_factor: float = field(default=1.0, metadata=ARCH)
    sliding_window: int | None = field(default=None, metadata=ARCH)
    norm_eps: float = field(default=1e-5, metadata=ARCH)
    tie_embeddings: bool = field(default=False, metadata=SHAPE_ARCH)
    init_std: float = 0.02
    qk_norm: str = field(default="none", metadata=SHAPE_ARCH)  # none | full (OLMoE) | per_head (Qwen3)
    attention_bias: bool = field(
        default=False, metadata=SHAPE_ARCH
    )  # biases on the q, k, v projections (Qwen2)
    attention_out_bias: bool = field(
        default=False, metadata=SHAPE_ARCH
    )  # a bias on the output projection too (gpt-oss)
    attention_sinks: bool = field(
        default=False, metadata=SHAPE_ARCH
    )  # a learned per-head sink logit in each softmax (gpt-oss)
    # Per layer sliding_attention | full_attention (gpt-oss alternates them); empty: model.sliding_window
    # (when set) applies to every layer.
    layer_types: list[str] = field(default_factory=list, metadata=ARCH)
    # Dense layers among MoE layers by index (Qwen2/3-MoE's mlp_only_layers), on top of moe_every.
    mlp_only_layers: list[int] = field(default_factory=list, metadata=SHAPE_ARCH)
    # A shared expert: a dense SwiGLU every token goes through, added to the routed experts' output
    # (Qwen2-MoE); 0 = none. With shared_expert_gate its output is scaled by sigmoid(x w_g), w_g [1, H].
    shared_expert_intermediate_size: int = field(default=0, metadata=SHAPE_ARCH)
    shared_expert_gate: bool = field(default=False, metadata=SHAPE_ARCH)
    # Start from a transformers model folder or hub id (shape, weights, tokenizer come from it), or
    # turn a dense one into an MoE (sparse upcycling); see moetrain/pretrained.py.
    init_from: str | None = None
    upcycle_from: str | None = None
    upcycle_noise: float = (
        0.0  # relative std of Gaussian noise added to each upcycled expert; 0 = exact copies
    )
    # Tokens per chunk of the fused LM head + cross-entropy (model/lm_loss.py): one [chunk, vocab]
    # logits buffer is live instead of several [tokens, vocab] tensors. None = ~16M logits per chunk,
    # at least 512 rows. Smaller saves memory and costs speed (the head's GEMMs shrink); the loss is
    # the same up to floating-point summation order. Not a shape: a resume may change it.
    loss_chunk_tokens: int | None = None
    moe: MoEConfig = field(default_factory=MoEConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata=SHAPE)
    mla: MLAConfig = field(
        default_factory=MLAConfig, metadata=SHAPE_ARCH
    )  # multi-head latent attention instead of GQA

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of layer ``layer_idx`` (None: full causal attention)."""
        if self.layer_types and self.layer_types[layer_idx] == "full_attention":
            return None
        return self.sliding_window

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (transformers: ``int(head_dim * partial_rotary_factor)``;
        MLA: its qk_rope_head_dim)."""
        if self.mla.enabled:
            return self.mla.qk_rope_head_dim
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def dense_ffn_size(self) -> int:
        return self.dense_ffn_hidden_size if self.dense_ffn_hidden_size is not None else self.ffn_hidden_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and (layer_idx + 1) % self.moe_every == 0
            and layer_idx not in self.mlp_only_layers
        )

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def validate(self, prefix: str = "model") -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "ffn_hidden_size",
        ):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, f"{prefix}.{name}", v, "must be a positive integer")
        _require(
            self.max_seq_len > 0, f"{prefix}.max_seq_len", self.max_seq_len, "must be a positive integer"
        )
        _require(self.num_experts >= 0, f"{prefix}.num_experts", self.num_experts, "must be >= 0 (0 = dense)")
        _require(self.moe_every >= 1, f"{prefix}.moe_every", self.moe_every, "must be >= 1")
        _require(
            self.loss_chunk_tokens is None
            or (type(self.loss_chunk_tokens) is int and self.loss_chunk_tokens > 0),
            f"{prefix}.loss_chunk_tokens",
            self.loss_chunk_tokens,
            "must be a positive integer (tokens per chunk of the fused LM head + loss) or null (automatic)",
        )
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_heads == 0,
                f"{prefix}.num_heads",
                self.num_heads,
                f"must divide hidden_size={self.hidden_size} (or set {prefix}.head_dim)",
            )
        else:
            _require(self.head_dim > 0, f"{prefix}.head_dim", self.head_dim, "must be a positive integer")
        _require(self.head_size % 2 == 0, f"{prefix}.head_dim", self.head_size, "must be even for RoPE")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"{prefix}.num_kv_heads",
            self.num_kv_heads,
            f"must divide num_heads={self.num_heads}",
        )
        if self.num_experts > 0:
            _require(
                1 <= self.top_k <= self.num_experts,
                f"{prefix}.top_k",
                self.top_k,
                f"must be between 1 and num_experts={self.num_experts}",
            )
            g = self.moe.n_group
            if g > 1:
                _require(
                    self.num_experts % g == 0 and self.num_experts // g >= 2,
                    f"{prefix}.moe.n_group",
                    g,
                    f"must divide num_experts={self.num_experts} into groups of >= 2 experts",
                )
                _require(
                    self.top_k <= self.moe.topk_group * (self.num_experts // g),
                    f"{prefix}.top_k",
                    self.top_k,
                    f"must be <= topk_group x experts per group = {self.moe.topk_group * (self.num_experts // g)}",
                )
        if self.dense_ffn_hidden_size is not None:
            _require(
                self.dense_ffn_hidden_size > 0,
                f"{prefix}.dense_ffn_hidden_size",
                self.dense_ffn_hidden_size,
                "must be a positive integer or null",
            )
        if self.sliding_window is not None:
            _require(
                self.sliding_window > 0, f"{prefix}.sliding_window", self.sliding_window, "positive or null"
            )
        _require(self.rope_theta > 0, f"{prefix}.rope_theta", self.rope_theta, "must be > 0")
        if self.rope_scaling is not None:
            from moetrain.model.rope import validate_rope_scaling

            validate_rope_scaling(self.rope_scaling, f"{prefix}.rope_scaling")
        _require(self.init_std > 0, f"{prefix}.init_std", self.init_std, "must be > 0")
        _require(self.qk_norm in QK_NORMS, f"{prefix}.qk_norm", self.qk_norm, f"one of {', '.join(QK_NORMS)}")
        layers = self.mlp_only_layers
        _require(
            isinstance(layers, (list, tuple))
            and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in layers
            ),
            f"{prefix}.mlp_only_layers",
            layers,
            f"a list of layer indices in 0..{self.num_layers - 1} (e.g. [0, 3])",
        )
        _require(
            isinstance(self.shared_expert_intermediate_size, int)
            and self.shared_expert_intermediate_size >= 0,
            f"{prefix}.shared_expert_intermediate_size",
            self.shared_expert_intermediate_size,
            "must be >= 0 (0 = no shared expert)",
        )
        if self.shared_expert_intermediate_size:
            _require(
                self.num_experts > 0,
                f"{prefix}.shared_expert_intermediate_size",
                self.shared_expert_intermediate_size,
                "needs routed experts (model.num_experts > 0); a dense model's FFN is dense_ffn_hidden_size",
            )
        else:
            _require(
                not self.shared_expert_gate,
                f"{prefix}.shared_expert_gate",
                self.shared_expert_gate,
                f"gates the shared expert: set {prefix}.shared_expert_intermediate_size > 0 or leave it false",
            )
        _require(
            not (self.init_from and self.upcycle_from),
            f"{prefix}.upcycle_from",
            self.upcycle_from,
            f"choose one: {prefix}.init_from (continue a model as it is) or {prefix}.upcycle_from (dense -> MoE)",
        )
        _require(
            self.upcycle_noise >= 0,
            f"{prefix}.upcycle_noise",
            self.upcycle_noise,
            "must be >= 0 (0 = exact copies)",
        )
        self.moe.validate(f"{prefix}.moe")
        self.lora.validate(f"{prefix}.lora")
        from moetrain.config.families import validate_family_options

        validate_family_options(self, prefix)  # gpt-oss / DeepSeek-V3 / GLM-4.5 options
