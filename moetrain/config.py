"""Typed configuration: Hydra composes YAML, these dataclasses validate it.

Every check runs when the config is built, before any expensive work, and fails with a
one-line ``ConfigError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

MOE_BACKENDS = ("auto", "torch", "megablocks")
EXPERT_IMPLS = ("auto", "grouped_mm", "loop")
AUX_LOSS_TYPES = ("switch", "mixtral")
AUX_LOSS_SCOPES = ("micro_batch", "global_batch")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
HOST_ALLOCATORS = ("retain", "system")  # parallel.host_allocator (trainer/host_memory.py)
# Normalisation of queries and keys before RoPE: none (Mixtral, Mistral, Qwen2-MoE), one RMSNorm over
# the whole q / k projection (OLMoE), or one per head over head_dim (Qwen3, Qwen3-MoE).
QK_NORMS = ("none", "full", "per_head")
# data.name values that are not Hugging Face Hub datasets: ours, and the `datasets` loaders for
# local files (data.data_files).
DATA_SOURCES = ("builtin", "fixture", "mixture", "tokens")
DATA_LOADERS = ("json", "text", "parquet", "csv", "arrow")
# data.on_exhausted: a mixture source (or the single source) that has been read once is read again in
# a new order (repeat) or ends the run with a checkpoint (stop).
ON_EXHAUSTED = ("repeat", "stop")
# data.token_dtype for headerless token files (.bin, OLMo-style raw .npy); .npy with a header and
# Megatron .bin with an .idx carry their own.
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64", "uint8")
# How data.name=text cuts files into documents (blank-line separated paragraphs by default).
TEXT_SPLITS = ("line", "paragraph", "file")
# Common names for a loader's file type that are not loader names themselves.
DATA_NAME_ALIASES = {
    "jsonl": "json",
    "jsonlines": "json",
    "ndjson": "json",
    "txt": "text",
    "plain": "text",
    "pq": "parquet",
    "feather": "arrow",
    "ipc": "arrow",
}


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line."""


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r} is invalid: {allowed}")


@dataclass
class MoEConfig:
    backend: str = "auto"  # auto: megablocks when CUDA + megablocks are present, else torch
    expert_impl: str = "auto"  # torch backend kernel: grouped_mm where torch has it, else a loop
    capacity_factor: float | None = None  # None = dropless
    aux_loss_weight: float = 0.01
    aux_loss_type: str = "switch"  # switch = E * sum(f_i * P_i); mixtral = transformers' formula
    aux_loss_scope: str = "micro_batch"
    z_loss_weight: float = 0.001
    normalize_top_k: bool = True  # Mixtral renormalises the top-k softmax weights
    jitter_eps: float = 0.0  # multiplicative input jitter during training (Switch)
    score_function: str = "softmax"  # softmax (Mixtral) | sigmoid (DeepSeek-V3; top-k renormalised)
    # Aux-loss-free balancing (DeepSeek-V3): per-expert selection bias b += u * sign(mean - load)
    # after every optimizer step, from the step's global loads. 0 = off (no bias in the model).
    bias_update_rate: float = 0.0
    seq_aux_loss_weight: float = 0.0  # DeepSeek-V3 sequence-wise balance loss weight (alpha); 0 = off
    # Group-limited routing (DeepSeek-V3, GLM-4.5): experts in n_group groups, each token chooses within
    # its topk_group best groups (by the sum of each group's two best scores). 1 / 1 = off.
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # multiplies the combine weights (DeepSeek-V3: 2.5)
    # Hold the expert-selection bias even with bias_update_rate=0 (a checkpoint's e_score_correction_bias,
    # kept as it is while fine-tuning); bias_update_rate > 0 implies it.
    selection_bias: bool = False
    router_bias: bool = False  # a bias on the router's gate (gpt-oss)
    expert_proj_bias: bool = False  # biases on the experts' gate / up and down projections (gpt-oss)
    expert_activation: str = "swiglu"  # swiglu | clamped_swiglu (gpt-oss: swiglu_alpha, swiglu_limit)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

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
    Checked by moetrain/config_families.py."""

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
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int | None = None  # None = hidden_size // num_heads
    ffn_hidden_size: int = 512  # per expert (and of dense FFN layers unless dense_ffn_hidden_size)
    dense_ffn_hidden_size: int | None = None
    num_experts: int = 8  # 0 = dense model
    top_k: int = 2
    moe_every: int = 1  # layer i is MoE iff num_experts > 0 and (i + 1) % moe_every == 0
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    # null = plain RoPE, or {rope_type: linear | dynamic | llama3 | yarn, <its fields>} named as in
    # transformers' rope_parameters (moetrain/model/rope.py lists them).
    rope_scaling: dict[str, Any] | None = None
    # RoPE on the first partial_rotary_factor * head_dim dims of each head, the rest unrotated (GLM-4.5: 0.5).
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    qk_norm: str = "none"  # none | full (OLMoE) | per_head (Qwen3)
    attention_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    attention_out_bias: bool = False  # a bias on the output projection too (gpt-oss)
    attention_sinks: bool = False  # a learned per-head sink logit in each softmax (gpt-oss)
    # Per layer sliding_attention | full_attention (gpt-oss alternates them); empty: model.sliding_window
    # (when set) applies to every layer.
    layer_types: list[str] = field(default_factory=list)
    # Dense layers among MoE layers by index (Qwen2/3-MoE's mlp_only_layers), on top of moe_every.
    mlp_only_layers: list[int] = field(default_factory=list)
    # A shared expert: a dense SwiGLU every token goes through, added to the routed experts' output
    # (Qwen2-MoE); 0 = none. With shared_expert_gate its output is scaled by sigmoid(x w_g), w_g [1, H].
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
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
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)  # multi-head latent attention instead of GQA

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
        from moetrain.config_families import validate_family_options

        validate_family_options(self, prefix)  # gpt-oss / DeepSeek-V3 / GLM-4.5 options


@dataclass
class DataConfig:
    name: str = "builtin"  # builtin | a datasets loader (json, text, parquet, csv) | a hub dataset name
    data_files: Any = None  # str, list or {split: files} for local loaders
    config_name: str | None = None
    split: str = "train"
    validation_split: str | None = None  # None: carve validation_fraction out of the train split
    validation_fraction: float = 0.005
    text_field: str = "text"
    text_split: str = "paragraph"  # data.name=text: one document per line | paragraph | file
    domain_field: str | None = "domain"
    seq_len: int = 256
    tokenizer: str | None = None  # None: the builtin BPE; else a name or path for AutoTokenizer
    vocab_size: int = 8192  # of the builtin BPE
    data_dir: str | None = None  # None: $MOETRAIN_DATA_DIR or ~/.cache/moetrain
    max_documents: int | None = None  # cap on documents (quick experiments)
    # data.name=mixture: a list of sources, each a mapping of the fields above (name, data_files,
    # text_field, ...) plus weight (> 0, normalised) and domain (a unique name; metrics use it).
    sources: list[Any] | None = None
    on_exhausted: str = "repeat"  # repeat | stop (see ON_EXHAUSTED)
    # Attention stays inside each EOS-terminated document of a packed block; positions restart at 0.
    document_masking: bool = False
    token_dtype: str | None = None  # data.name=tokens, headerless files only
    weight: float = 1.0  # as a mixture source
    domain: str | None = None  # as a mixture source (default: the source's name)
    # Keep only the documents whose domain_field value is this (e.g. one domain of the builtin corpus).
    select_domain: str | None = None

    def validate(self, prefix: str = "data") -> None:
        _require(bool(self.name), f"{prefix}.name", self.name, "must name a dataset ('builtin', 'json', ...)")
        guess = suggest_data_name(self.name)
        if guess is not None:
            raise ConfigError(
                f"{prefix}.name={self.name!r} is not a dataset loader: did you mean {prefix}.name={guess}? "
                f"(local files: {', '.join(DATA_LOADERS)} with {prefix}.data_files; "
                f"{' or '.join(DATA_SOURCES)}; any other name is a Hugging Face Hub dataset)"
            )
        _require(self.seq_len > 0, f"{prefix}.seq_len", self.seq_len, "must be a positive integer")
        _require(
            0 < self.validation_fraction < 1,
            f"{prefix}.validation_fraction",
            self.validation_fraction,
            "must be in (0, 1)",
        )
        _require(bool(self.text_field), f"{prefix}.text_field", self.text_field, "must name a text column")
        _require(
            self.text_split in TEXT_SPLITS,
            f"{prefix}.text_split",
            self.text_split,
            f"one of {', '.join(TEXT_SPLITS)} (documents of data.name=text files)",
        )
        _require(
            self.vocab_size >= 300,
            f"{prefix}.vocab_size",
            self.vocab_size,
            "must be >= 300 (bytes + specials)",
        )
        _require(
            self.on_exhausted in ON_EXHAUSTED,
            f"{prefix}.on_exhausted",
            self.on_exhausted,
            f"one of {', '.join(ON_EXHAUSTED)}",
        )
        _require(
            self.token_dtype is None or self.token_dtype in TOKEN_DTYPES,
            f"{prefix}.token_dtype",
            self.token_dtype,
            f"null (from the file) or one of {', '.join(TOKEN_DTYPES)}",
        )
        _require(
            isinstance(self.weight, (int, float)) and self.weight > 0 and math.isfinite(self.weight),
            f"{prefix}.weight",
            self.weight,
            "must be a positive number (a mixture source's share, normalised over the sources)",
        )
        if self.name == "tokens" and self.data_files is None:
            raise ConfigError(
                f"{prefix}.name=tokens needs {prefix}.data_files: token files (.npy, .bin), a glob, a "
                "list, {train: ..., validation: ...} or a folder written by python -m moetrain.data.prepare"
            )
        if self.name == "mixture":
            self.mixture_sources(prefix)
        elif self.sources is not None:
            raise ConfigError(
                f"{prefix}.sources is set but {prefix}.name={self.name!r}: use {prefix}.name=mixture "
                f"to train on the sources, or remove {prefix}.sources"
            )

    # Fields a mixture source takes from the mixture itself (one tokenizer, one block length).
    SHARED_FIELDS = ("seq_len", "tokenizer", "vocab_size", "data_dir", "document_masking", "on_exhausted")

    def mixture_sources(self, prefix: str = "data") -> list[DataConfig]:
        """``data.sources`` as validated configs: each source's own fields, the shared ones from the
        mixture, ``domain`` defaulting to the source's name. One-line errors name the source."""
        if not isinstance(self.sources, (list, tuple)) or not self.sources:
            raise ConfigError(
                f"{prefix}.name=mixture needs {prefix}.sources: a non-empty list of sources, e.g. "
                f"[{{name: json, data_files: a.jsonl, weight: 0.7, domain: web}}, ...]"
            )
        shared = {k: getattr(self, k) for k in self.SHARED_FIELDS}
        out: list[DataConfig] = []
        for i, raw in enumerate(self.sources):
            where = f"{prefix}.sources[{i}]"
            if not isinstance(raw, dict):
                raise ConfigError(f"{where} must be a mapping with name, weight, domain, ... (got {raw!r})")
            for key in self.SHARED_FIELDS:
                if key in raw and raw[key] != shared[key]:
                    raise ConfigError(
                        f"{where}.{key} is invalid: every source shares the mixture's {prefix}.{key} "
                        f"({shared[key]!r}); set it on {prefix} instead"
                    )
            if raw.get("name") in ("mixture", None) or "sources" in raw:
                raise ConfigError(f"{where}.name={raw.get('name')!r} is invalid: a source is not a mixture")
            if "weight" not in raw:
                raise ConfigError(f"{where}.weight is missing: give each source a positive weight")
            src = _build(DataConfig, {**raw, **shared}, where)
            src.validate(where)
            if src.domain is None:
                src.domain = os.path.basename(str(src.name).rstrip("/")) or f"source{i}"
            out.append(src)
        domains = [s.domain for s in out]
        dupes = sorted({d for d in domains if domains.count(d) > 1})
        if dupes:
            raise ConfigError(
                f"{prefix}.sources: domain {dupes[0]!r} is used by more than one source; give each "
                "source its own domain (metrics are logged per domain)"
            )
        return out


def _edit_distance_at_most_one(a: str, b: str) -> bool:
    """One insertion, deletion, substitution or swap of neighbours turns ``a`` into ``b``."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def suggest_data_name(name: str) -> str | None:
    """The loader or source a ``data.name`` that is none of them most likely meant, or None.

    ``jsonl`` -> ``json``, ``txt`` -> ``text``, ``parqet`` -> ``parquet``, ``JSON`` -> ``json``. Names
    of local paths, hub ids (``owner/name``) and anything further from a known name are left alone:
    they may be real Hugging Face Hub datasets (``wikitext``).
    """
    known = DATA_SOURCES + DATA_LOADERS
    if not isinstance(name, str) or name in known or "/" in name or os.path.exists(name):
        return None
    low = name.lower().strip()
    if low in known:
        return low
    if low in DATA_NAME_ALIASES:
        return DATA_NAME_ALIASES[low]
    close = [k for k in known if _edit_distance_at_most_one(low, k)]
    return close[0] if len(close) == 1 else None


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    micro_batch_size: int = 8  # per rank
    grad_accum: int = 1

    def validate(self, prefix: str = "optim") -> None:
        _require(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        _require(
            0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]"
        )
        _require(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        _require(len(self.betas) == 2, f"{prefix}.betas", self.betas, "must be two numbers")
        _require(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _require(
            self.micro_batch_size > 0, f"{prefix}.micro_batch_size", self.micro_batch_size, "must be > 0"
        )
        _require(self.grad_accum > 0, f"{prefix}.grad_accum", self.grad_accum, "must be > 0")


@dataclass
class ParallelConfig:
    ep_size: int = 1
    # 3 partitions the weights too (experts over their expert-data-parallel group), docs/EXPERT_PARALLEL.md
    zero_stage: int = 0
    # ZeRO 1-3: fp32 master weights and AdamW state in host memory, stepped there (DeepSpeed ZeRO-Offload)
    offload_optimizer: bool = False
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    # torch.compile each transformer block (inductor; experts and token exchange stay eager). Needs a
    # C++ compiler and Python headers on CPU, triton on CUDA. See model/compile.py.
    compile: bool = False
    deepspeed_config: str | None = None  # a user JSON merged over the generated one
    shm_comm: bool = False  # DeepSpeed's CPU shared-memory collectives (JIT-compiles an op once)
    check_memory: bool = True  # stop at start when the training state cannot fit this machine
    # CPU training: retain = freed host memory stays in the process for reuse (no page faults per
    # step on large tensors; trainer/host_memory.py); system = malloc's defaults. No effect on CUDA.
    host_allocator: str = "retain"

    def validate(self, prefix: str = "parallel") -> None:
        _require(self.ep_size >= 1, f"{prefix}.ep_size", self.ep_size, "must be >= 1")
        _require(
            self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage", self.zero_stage, "one of 0, 1, 2, 3"
        )
        _require(
            not self.offload_optimizer or self.zero_stage >= 1,
            f"{prefix}.offload_optimizer",
            self.offload_optimizer,
            "needs parallel.zero_stage=1, 2 or 3 (ZeRO-0 keeps no partition to offload)",
        )
        _require(
            not (self.compile and self.zero_stage == 3),
            f"{prefix}.compile",
            self.compile,
            "not supported with parallel.zero_stage=3 (ZeRO-3 gathers weights in module hooks); use 0, 1 or 2",
        )
        _require(
            self.dtype in ("auto", "fp32", "bf16"), f"{prefix}.dtype", self.dtype, "one of auto, fp32, bf16"
        )
        _require(
            self.host_allocator in HOST_ALLOCATORS,
            f"{prefix}.host_allocator",
            self.host_allocator,
            f"one of {', '.join(HOST_ALLOCATORS)}",
        )


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "moetrain"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def validate(self, prefix: str = "logging.wandb") -> None:
        modes = ("offline", "online", "disabled")
        _require(self.mode in modes, f"{prefix}.mode", self.mode, f"one of {modes}")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    heatmap_every: int = 100  # experts x layers heatmap to W&B
    collapse_threshold: float = 0.1  # warn when an expert gets < this share of its fair load...
    collapse_window: int = 20  # ...for this many consecutive logged steps

    def validate(self, prefix: str = "logging") -> None:
        self.wandb.validate(f"{prefix}.wandb")
        _require(
            0 <= self.collapse_threshold < 1,
            f"{prefix}.collapse_threshold",
            self.collapse_threshold,
            "in [0, 1)",
        )
        _require(self.collapse_window >= 1, f"{prefix}.collapse_window", self.collapse_window, "must be >= 1")


@dataclass
class TrainerConfig:
    max_steps: int = 100
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 50
    keep_last: int = 2
    resume: str | None = None  # null | auto | a checkpoint path
    stop_at: int | None = None
    stop_after_minutes: float | None = None
    sample_prompt: str = "To be, or not to be"
    sample_tokens: int = 40
    deterministic: bool = True
    # Preemption: these signals stop the run after the current step with a checkpoint (exit 0).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    # A non-finite loss or gradient norm: skip that update (bounded) or stop with an error.
    on_nonfinite: str = "skip"
    max_skipped_steps: int = 3  # more skips than this within skip_window steps = diverged: stop
    skip_window: int = 100
    # Older checkpoints hold pickles; only the restricted unpickler reads them unless this is true
    # (for a checkpoint you made yourself: a pickle can run code). New checkpoints hold none.
    trust_checkpoint_code: bool = False
    async_checkpoint: bool = True  # a save blocks only while staging to host memory; files in background
    on_save_error: str = (
        "stop"  # stop (one line, latest intact) | continue (retry at the next checkpoint step)
    )
    max_failed_saves: int = 3  # continue: stop after this many failed saves in a row
    force_unlock: bool = False  # take the run-dir lock even if another process holds it

    def validate(self, prefix: str = "trainer") -> None:
        _require(self.max_steps > 0, f"{prefix}.max_steps", self.max_steps, "must be > 0")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            _require(v >= 0, f"{prefix}.{name}", v, "must be >= 0 (0 = off)")
        _require(self.keep_last >= 1, f"{prefix}.keep_last", self.keep_last, "must be >= 1")
        if self.stop_at is not None:
            _require(
                0 < self.stop_at <= self.max_steps,
                f"{prefix}.stop_at",
                self.stop_at,
                f"must be in 1..max_steps={self.max_steps}",
            )
        if self.stop_after_minutes is not None:
            _require(
                self.stop_after_minutes > 0, f"{prefix}.stop_after_minutes", self.stop_after_minutes, "> 0"
            )
        import signal as _signal

        for name in self.stop_signals:
            _require(
                isinstance(name, str) and name.startswith("SIG") and hasattr(_signal, name),
                f"{prefix}.stop_signals",
                name,
                "signal names such as SIGTERM, SIGINT, SIGUSR1, SIGUSR2",
            )
        _require(
            self.on_nonfinite in ("skip", "stop"), f"{prefix}.on_nonfinite", self.on_nonfinite, "skip | stop"
        )
        _require(self.max_skipped_steps >= 0, f"{prefix}.max_skipped_steps", self.max_skipped_steps, ">= 0")
        _require(self.skip_window >= 1, f"{prefix}.skip_window", self.skip_window, ">= 1")
        _require(
            self.on_save_error in ("continue", "stop"),
            f"{prefix}.on_save_error",
            self.on_save_error,
            "continue | stop",
        )
        _require(self.max_failed_saves >= 1, f"{prefix}.max_failed_saves", self.max_failed_saves, ">= 1")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate_sections(self) -> TrainConfig:
        """Each section on its own; ``validate`` adds the checks across sections. (A pretrained model's
        shape replaces the model section in between: moetrain.pretrained.resolve_pretrained.)"""
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.parallel.validate()
        self.logging.validate()
        self.trainer.validate()
        return self

    def validate(self) -> TrainConfig:
        self.validate_sections()
        if self.parallel.ep_size > 1:
            _require(
                self.model.num_experts > 0 and self.model.num_experts % self.parallel.ep_size == 0,
                "parallel.ep_size",
                self.parallel.ep_size,
                f"must divide model.num_experts={self.model.num_experts}",
            )
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            self.data.seq_len,
            f"must be <= model.max_seq_len={self.model.max_seq_len}",
        )
        return self


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Recursively build dataclass ``cls`` from a mapping, rejecting unknown keys with a one-liner."""
    if values is None:
        return cls()
    if dataclasses.is_dataclass(values):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}  # strings (postponed annotations)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where} is not a known option (known: {', '.join(sorted(known))})")
        f = known[key]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value, f"{prefix}.{key}" if prefix else key)
        elif key == "betas" and value is not None:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = _check_type(value, hints[key], f"{prefix}.{key}" if prefix else key)
    return cls(**kwargs)


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Reject a value of the wrong scalar type (``model.hidden_size=abc``) with a one-line error."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    options = [t.strip() for t in str(text).split("|")]
    if value is None:
        if "None" in options or "Any" in options:
            return value
        raise ConfigError(f"{where}=null is invalid: a value is required")
    allowed: tuple[type, ...] = ()
    for opt in options:
        if opt not in _SCALARS:
            return value  # lists, mappings, Any: checked by validate() where it matters
        allowed += _SCALARS[opt]
    if isinstance(value, bool) and bool not in allowed:  # True is an int in Python; not a size
        raise ConfigError(f"{where}={value!r} is invalid: expected {' or '.join(options)}")
    if not isinstance(value, allowed):
        raise ConfigError(
            f"{where}={value!r} is invalid: expected {' or '.join(o for o in options if o != 'None')}"
        )
    return (
        float(value) if "float" in options and "int" not in options and not isinstance(value, bool) else value
    )


def training_dtype(name: str) -> str:
    """``fp32`` or ``bf16`` for ``parallel.dtype``: ``auto`` is bf16 on a CUDA device that supports it,
    fp32 otherwise. The one rule, used by the trainer (trainer/engine.py) and by plan."""
    if name in ("fp32", "bf16"):
        return name
    if name != "auto":
        raise ConfigError(f"parallel.dtype={name!r} is invalid: one of auto, fp32, bf16")
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def check_world_size(parallel: ParallelConfig, world_size: int, *, module: str = "moetrain.train") -> None:
    """The number of processes must be a multiple of ``parallel.ep_size``; say how to start them."""
    ep = parallel.ep_size
    if world_size % ep == 0:
        return
    if world_size == 1:
        raise ConfigError(
            f"parallel.ep_size={ep} needs {ep} processes (or a multiple), but this is a single process: "
            f"start {ep} with `torchrun --nproc_per_node={ep} -m {module} ...` or "
            f"`NPROC={ep} scripts/train_local.sh ...` (or set parallel.ep_size=1)"
        )
    raise ConfigError(
        f"parallel.ep_size={ep} is invalid: must divide the number of processes ({world_size}); "
        f"start a multiple of {ep} processes or choose an ep_size that divides {world_size}"
    )


def parallel_config_from_dict(values: dict[str, Any]) -> ParallelConfig:
    cfg = _build(ParallelConfig, dict(values), "parallel")
    cfg.validate()
    return cfg


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    cfg = _build(ModelConfig, dict(values), "model")
    cfg.validate()
    return cfg


def train_config_from_dict(values: dict[str, Any], *, cross_checks: bool = True) -> TrainConfig:
    """Build and validate from a plain dict (e.g. ``OmegaConf.to_container(cfg, resolve=True)``).

    Keys that are not ours (``hydra``, ``plan``, ``experiment`` ...) are ignored at the top level.
    ``cross_checks=False`` validates each section only (the caller completes the model section, then
    calls ``validate()``).
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = _build(TrainConfig, {k: v for k, v in values.items() if k in known}, "")
    return cfg.validate() if cross_checks else cfg.validate_sections()


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---- Hydra: the dataclasses are the one source of every default ------------------------------------
# Each config group gets a `base` node holding its dataclass's defaults; every preset YAML starts from
# it (`defaults: [base, _self_]`) and holds only what differs, and every key exists for a command-line
# override. The nodes are plain dicts, not structured configs, so a wrongly typed value still fails
# with our one-line ConfigError (from _build) rather than OmegaConf's multi-line one.
CONFIG_GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
    "logging": LoggingConfig,
    "trainer": TrainerConfig,
}


def register_config_defaults() -> None:
    """Store each group's ``base`` node in Hydra's ConfigStore (idempotent; ``import moetrain`` does it,
    so any ``compose`` over the packaged configs finds them)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, cls in CONFIG_GROUPS.items():
        store.store(group=group, name="base", node=dataclasses.asdict(cls()))
