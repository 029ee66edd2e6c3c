"""What every family's conversion shares: the decoder fields all transformers configs name alike (both
directions), the balance-loss coefficient, the dropless warning and the one-line refusal."""

from __future__ import annotations

import warnings
from typing import Any

from moetrain.config import ModelConfig


def refuse(msg: str) -> None:
    raise ValueError(msg)


def special_ids(tokenizer: Any | None) -> dict[str, Any]:
    """The tokenizer's bos / eos / pad ids for the config (None without a tokenizer)."""
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: None if tokenizer is None else getattr(tokenizer, k) for k in names}


def decoder_config(cfg: ModelConfig, tokenizer: Any | None) -> dict[str, Any]:
    """The transformers config fields of the decoder every family has (sizes, norm, tied embeddings);
    the caller adds RoPE, windows and its FFN."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        **special_ids(tokenizer),
    }


def decoder_fields(hf_config: Any) -> dict[str, Any]:
    """The ``ModelConfig`` fields of the decoder every family has, read from a transformers config
    (``head_dim`` None where it is hidden_size / num_heads, as ours defaults)."""
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim == hf_config.hidden_size // hf_config.num_attention_heads:
        head_dim = None
    return {
        "name": getattr(hf_config, "_name_or_path", None) or hf_config.model_type,
        "vocab_size": hf_config.vocab_size,
        "hidden_size": hf_config.hidden_size,
        "num_layers": hf_config.num_hidden_layers,
        "num_heads": hf_config.num_attention_heads,
        "num_kv_heads": hf_config.num_key_value_heads or hf_config.num_attention_heads,
        "head_dim": head_dim,
        "max_seq_len": hf_config.max_position_embeddings,
        "norm_eps": hf_config.rms_norm_eps,
        "tie_embeddings": bool(hf_config.tie_word_embeddings),
        "init_std": hf_config.initializer_range,
    }


def require_silu(hf_config: Any) -> None:
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"{hf_config.model_type}: hidden_act={hf_config.hidden_act!r} is not supported (only 'silu')"
        )


def aux_coef(cfg: ModelConfig) -> float:
    """transformers' coefficient that weighs the balance loss as our training did: our weight for
    ``aux_loss_type=mixtral`` (the same formula), our weight / top_k for ``switch`` (Mixtral's loss is
    top_k times Switch's for one layer). Every MoE family but DeepSeek's uses Mixtral's loss function."""
    moe = cfg.moe
    return moe.aux_loss_weight if moe.aux_loss_type == "mixtral" else moe.aux_loss_weight / cfg.top_k


def warn_capacity(cfg: ModelConfig) -> None:
    if cfg.moe.capacity_factor is not None:
        warnings.warn(
            f"model.moe.capacity_factor={cfg.moe.capacity_factor}: transformers runs dropless, so its "
            "logits differ from ours wherever our model dropped tokens",
            UserWarning,
            stacklevel=3,
        )
