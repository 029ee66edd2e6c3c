"""Activation memory of one training micro-batch on one rank: what moetrain's model stores for backward.

Counted tensor by tensor from the code (N = micro_batch * seq_len tokens, a = 2 or 4 bytes):

* RMSNorm keeps its fp32 input (4NH: a copy in bf16, the input itself in fp32), the normalised tensor
  before the weight (aNH) and its output (aNH, the next linear's input).
* Attention (SDPA, flash / memory-efficient kernels: no [T, T] scores): q after RoPE, k and v expanded
  to every head (GQA repeats them before SDPA), the output, its [N, heads] fp32 log-sum-exp, and the
  output's contiguous copy that o_proj keeps. RoPE multiplies by constant tables, which keeps nothing.
* MoE: the router's fp32 logits / probabilities ([N, E]), the ``top_k`` gathered token copies (aNkH,
  on whichever rank runs the expert), the SwiGLU's gate, silu(gate), up and their product (4 aNkF),
  the expert outputs the combine keeps (aNkH), and three int64 index vectors of N·k entries.
* The fused LM loss (model/lm_loss.py) makes no [N, V] logits: it keeps the input gradient (aNH) and
  the head's weight gradient (fp32 V·H when the tokens span several chunks), and one chunk's fp32
  [chunk, V] logits and log-softmax are live at a time.

Peak = stored + the working set of the layer being differentiated (its gradients are about as big as
what it stored: one layer's worth). With activation checkpointing each block keeps only its input
(aNH); its activations come back one block at a time in backward. Buffers of the collectives,
allocator slack and the CUDA context are not counted.
"""

from __future__ import annotations

from typing import Any

from moetrain.config import ModelConfig

ACTIVATION_BYTES = {"fp32": 4, "bf16": 2}
CHUNK_LOGITS = 1 << 24  # model/lm_loss.py: tokens per loss chunk = max(512, 2^24 / V)
MIN_CHUNK_ROWS = 512


def _norm(n: int, width: int, a: int) -> int:
    return n * width * (4 + 2 * a) + 4 * n  # fp32 input, normalised, output (+ fp32 rsqrt)


def _attention(cfg: ModelConfig, n: int, a: int) -> int:
    q = cfg.num_heads * cfg.head_size
    kv = cfg.num_kv_heads * cfg.head_size
    kv_saved = q if cfg.num_heads != cfg.num_kv_heads else kv  # GQA: k, v repeated to every head
    out = a * n * (q + 2 * kv_saved + q + q)  # q, k, v, output, o_proj's contiguous input
    out += 4 * n * cfg.num_heads  # log-sum-exp
    if cfg.qk_norm == "full" or cfg.qk_norm == "per_head":
        out += n * (q + kv) * (4 + a)
    return out


def _swiglu(n: int, width: int, a: int) -> int:
    return 4 * a * n * width  # gate, silu(gate), up, product


def layer_bytes(cfg: ModelConfig, layer: int, n: int, a: int) -> dict[str, int]:
    """Bytes one block stores for backward, by part."""
    parts = {"attention": _norm(n, cfg.hidden_size, a) + _attention(cfg, n, a)}
    ffn = _norm(n, cfg.hidden_size, a)
    if cfg.is_moe_layer(layer):
        k, h = cfg.top_k, cfg.hidden_size
        ffn += 3 * 4 * n * cfg.num_experts  # router logits, probabilities, log-sum-exp terms (fp32)
        ffn += 2 * a * n * k * h + _swiglu(n * k, cfg.ffn_hidden_size, a)  # copies in, experts, out
        ffn += 3 * 8 * n * k + 4 * n * k  # int64 positions / token / slot indices, fp32 weights
        if cfg.shared_expert_intermediate_size:
            ffn += _swiglu(n, cfg.shared_expert_intermediate_size, a)
    else:
        ffn += _swiglu(n, cfg.dense_ffn_size, a)
    parts["ffn"] = ffn
    return parts


def activation_memory(
    cfg: ModelConfig,
    *,
    micro_batch_size: int,
    seq_len: int,
    dtype: str,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """Peak activation bytes of one forward + backward on one rank (see the module docstring).

    Returns ``stored`` (what autograd keeps when the backward starts), ``working`` (the largest layer's
    recomputation and gradients on top of it), ``total`` (= the peak, what plan counts), and
    ``per_layer`` (the largest block's stored bytes)."""
    a = ACTIVATION_BYTES[dtype]
    n = micro_batch_size * seq_len
    h, v = cfg.hidden_size, cfg.vocab_size
    layers = [sum(layer_bytes(cfg, i, n, a).values()) for i in range(cfg.num_layers)]
    largest = max(layers) if layers else 0
    chunk = min(n, max(MIN_CHUNK_ROWS, CHUNK_LOGITS // max(1, v)))
    head = _norm(n, h, a) + a * n * h  # final norm; the loss keeps dh
    head += 4 * v * h if n > chunk else a * v * h  # the weight gradient (summed in fp32 over chunks)
    loss_working = 8 * chunk * v  # a chunk's fp32 logits and their log-softmax
    if checkpointing:
        stored = cfg.num_layers * a * n * h + head
        working = 2 * largest  # the block recomputed, and its gradients
    else:
        stored = sum(layers) + head
        working = largest
    return {
        "tokens": n,
        "checkpointing": checkpointing,
        "stored": stored,
        "working": max(working, loss_working),
        "total": stored + max(working, loss_working),
        "per_layer": largest,
    }
