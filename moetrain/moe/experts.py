"""SwiGLU experts stored fused: one parameter per projection for all (local) experts.

Canonical layout (shared with MegaBlocks' dMoE and mapped onto transformers' Mixtral by views):
    w1, v1, w2: [E, F, H]      out_e(x) = (silu(x w1[e]^T) * (x v1[e]^T)) w2[e]
MegaBlocks holds the same bytes as 2-D [E*F, H]; transformers' experts.e.w1 = w1[e],
experts.e.w3 = v1[e], experts.e.w2 = w2[e]^T.

Row blocks. On CPUs with bf16 instructions (AVX-512 or AMX) torch runs bf16 GEMMs (and fp16 ones,
on CPUs with fp16 instructions) in oneDNN, which JIT-compiles a kernel for every new GEMM shape (an
``mmap`` of generated code per kernel; its primitive cache holds 1024). An expert's row count changes
with every routing decision, so nearly every expert GEMM of a training step, forward and backward,
compiled a kernel (161-216 per mixtral_small step, counted with strace) and ran ~0.5x as fast as the
same GEMM with a cached kernel. Padding each expert's rows to a multiple of ``row_block`` bounds the
shapes to a few dozen per weight, all cached after the first steps; the padding rows cost at most
``row_block - 1`` rows per expert of extra GEMM work and never reach the result (their outputs are
dropped, their gradients are zero). fp32 (MKL), CUDA and torch's own half-precision kernels (a CPU
without those instructions) are not compiled per shape, so they run unpadded
(benchmarks/results/row_blocks_expert_gemms_epyc-avx512bf16_2026-12-02.md,
benchmarks/results/layer_and_step_epyc-avx2_2026-12-02.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.moe.dispatch import GatherRows, padded_rows

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """grouped_mm's backward rejects broadcast (stride-0) incoming gradients; make them dense."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def onednn_runs_cpu_gemm(dtype: torch.dtype) -> bool:
    """Whether torch hands CPU GEMMs of this half dtype to oneDNN. Only where the CPU has the
    instructions (bf16: AVX-512 BW/VL/DQ or AMX; fp16: AVX-512 FP16 or AMX-FP16) and oneDNN is on;
    elsewhere, e.g. an AVX2-only x86 CPU, torch runs them in its own kernel, nothing compiled per
    shape and 96-168x slower than fp32 (benchmarks/results/layer_and_step_epyc-avx2_2026-12-02.md)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return _cpu_has_onednn_half_gemm(dtype == torch.bfloat16)


_ONEDNN_HALF_GEMM: dict[bool, bool] = {}


def _cpu_has_onednn_half_gemm(bf16: bool) -> bool:
    """The CPU's answer, asked once per process: ``default_row_block`` runs on every MoE forward. A
    plain dict, not ``functools.cache``: torch.compile (parallel.compile) traces through a dict
    lookup but warns about, and ignores, an lru_cache wrapper."""
    if bf16 not in _ONEDNN_HALF_GEMM:
        name = "_is_mkldnn_bf16_supported" if bf16 else "_is_mkldnn_fp16_supported"
        try:
            _ONEDNN_HALF_GEMM[bf16] = bool(getattr(torch.ops.mkldnn, name)())
        except (AttributeError, RuntimeError):  # a torch without the query: assume oneDNN runs them
            _ONEDNN_HALF_GEMM[bf16] = True
    return _ONEDNN_HALF_GEMM[bf16]


def default_row_block(device: torch.device, dtype: torch.dtype) -> int:
    """Rows per expert are padded to a multiple of this (1: no padding); see the module docstring.
    16, 32 and 64 measured alike (benchmarks/results/row_blocks_expert_gemms_epyc-avx512bf16_2026-12-02.md);
    32 wastes at most 31 rows per expert and leaves at most 128 row counts per weight for 4096 copies,
    well inside oneDNN's 1024-kernel cache.
    Where torch's own kernel runs the GEMM instead (``onednn_runs_cpu_gemm``) padding buys nothing."""
    if device.type == "cpu" and onednn_runs_cpu_gemm(dtype):
        return 32
    return 1


class _PadRows(GatherRows):
    """x_SH -> x_PH (index: src_P, inverse: dest_S): every expert's rows followed by padding rows
    (copies of row 0: finite, never used). Backward keeps the real rows' gradients; the padding rows'
    are zero (see _UnpadRows)."""

    @staticmethod
    def backward(ctx, grad_PH: torch.Tensor):  # type: ignore[override]
        (dest_S,) = ctx.saved_tensors
        return grad_PH.index_select(0, dest_S), None, None


class _UnpadRows(torch.autograd.Function):
    """y_PH -> y_SH, the real rows. Backward: zero gradient for the padding rows, so they add exactly
    nothing to the weight gradients and, row by row through the SwiGLU, to the input gradient."""

    @staticmethod
    def forward(ctx, y_PH: torch.Tensor, dest_S: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(dest_S)
        ctx.num_padded = y_PH.shape[0]
        return y_PH.index_select(0, dest_S)

    @staticmethod
    def backward(ctx, grad_SH: torch.Tensor):  # type: ignore[override]
        (dest_S,) = ctx.saved_tensors
        grad_PH = grad_SH.new_zeros(ctx.num_padded, grad_SH.shape[1])
        return grad_PH.index_copy_(0, dest_S, grad_SH), None


def grouped_mm_supported(hidden_size: int, ffn_hidden_size: int, dtype: torch.dtype) -> bool:
    """grouped_mm needs 16-byte aligned rows on CPU."""
    item = torch.empty((), dtype=dtype).element_size()
    return _HAS_GROUPED_MM and (hidden_size * item) % 16 == 0 and (ffn_hidden_size * item) % 16 == 0


EXPERT_WEIGHTS = ("w1", "v1", "w2")  # [E, F, H] each
EXPERT_BIASES = ("w1_bias", "v1_bias", "w2_bias")  # [E, F], [E, F], [E, H] (gpt-oss)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation: gate clamped above, up clamped both ways, ``(up + 1) * gate * sigmoid(alpha gate)``."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class GroupedExperts(nn.Module):
    """``bias``: per-expert biases on gate / up (``w1_bias``, ``v1_bias`` [E, F]) and down (``w2_bias`` [E, H]),
    added per row by the row's expert (gpt-oss). ``activation``: ``swiglu`` or ``clamped_swiglu``."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        impl: str = "auto",
        *,
        bias: bool = False,
        activation: str = "swiglu",
        alpha: float = 1.702,
        limit: float = 7.0,
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        self.impl = impl
        self.activation, self.alpha, self.limit = activation, float(alpha), float(limit)
        # Rows per expert padded to a multiple of this before the GEMMs; None: default_row_block.
        self.row_block: int | None = None
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.v1 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.has_bias = bias
        if bias:
            self.w1_bias = nn.Parameter(torch.zeros(num_experts, ffn_hidden_size))
            self.v1_bias = nn.Parameter(torch.zeros(num_experts, ffn_hidden_size))
            self.w2_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))

    @property
    def param_names(self) -> tuple[str, ...]:
        """The per-expert base parameters (dim 0 = local expert): what expert parallelism shards and
        ZeRO-3 places by expert group (LoRA adapters, added later, are not among them)."""
        return EXPERT_WEIGHTS + EXPERT_BIASES if self.has_bias else EXPERT_WEIGHTS

    def _act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.activation == "clamped_swiglu":
            return clamped_swiglu(gate, up, self.alpha, self.limit)
        return F.silu(gate) * up

    def resolved_impl(self, dtype: torch.dtype) -> str:
        if self.impl != "auto":
            return self.impl
        return "grouped_mm" if grouped_mm_supported(self.hidden_size, self.ffn_hidden_size, dtype) else "loop"

    def resolved_row_block(self, device: torch.device, dtype: torch.dtype) -> int:
        return self.row_block or default_row_block(device, dtype)

    def forward(self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """x_SH: token copies sorted by (local) expert; tokens_per_expert_E: their int counts."""
        block = self.resolved_row_block(x_SH.device, x_SH.dtype)
        # Rows already in blocks (the local dispatch plan pads them, see dispatch.py) need nothing.
        if block > 1 and x_SH.shape[0] > 0 and bool((tokens_per_expert_E % block).any()):
            padded_E, dest_S, src_P = padded_rows(tokens_per_expert_E, block)
            y_PH = self._compute(_PadRows.apply(x_SH, src_P, dest_S), padded_E)
            return _UnpadRows.apply(y_PH, dest_S)
        return self._compute(x_SH, tokens_per_expert_E)

    def _compute(self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        # grouped_mm rejects an empty batch (an expert-parallel rank can receive no tokens at all).
        if self.resolved_impl(x_SH.dtype) == "grouped_mm" and x_SH.shape[0] > 0:
            return self._grouped_mm(x_SH, tokens_per_expert_E)
        return self._loop(x_SH, tokens_per_expert_E)

    # One projection of the experts: ``w1`` / ``v1`` map H -> F, ``w2`` (stored [E, F, H]) F -> H.
    # Subclasses add to it (LoRA adapters, model/lora.py); the biases and the activation stay here.
    def _project(self, x_S: torch.Tensor, name: str, offs: torch.Tensor) -> torch.Tensor:
        w = getattr(self, name)
        return F.grouped_mm(x_S, w if name == "w2" else w.transpose(1, 2), offs=offs)

    def _project_one(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        w = getattr(self, name)[e]
        return x @ w if name == "w2" else x @ w.T

    def _grouped_mm(self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
        gate, up = self._project(x_SH, "w1", offs), self._project(x_SH, "v1", offs)
        if self.has_bias:  # each row's expert's bias
            rows_S = torch.repeat_interleave(
                torch.arange(self.num_experts, device=x_SH.device),
                tokens_per_expert_E,
                output_size=x_SH.shape[0],
            )
            gate = gate + self.w1_bias.index_select(0, rows_S)
            up = up + self.v1_bias.index_select(0, rows_S)
        out = _ContiguousGrad.apply(self._project(self._act(gate, up), "w2", offs))
        return out + self.w2_bias.index_select(0, rows_S) if self.has_bias else out

    def _loop(self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Reference path (and the fallback where grouped_mm cannot run): one expert at a time."""
        counts = tokens_per_expert_E.tolist()
        outs = []
        for e, x_e in enumerate(torch.split(x_SH, counts)):
            gate, up = self._project_one(x_e, "w1", e), self._project_one(x_e, "v1", e)
            if self.has_bias:
                gate, up = gate + self.w1_bias[e], up + self.v1_bias[e]
            out = self._project_one(self._act(gate, up), "w2", e)
            outs.append(out + self.w2_bias[e] if self.has_bias else out)
        return torch.cat(outs) if outs else x_SH.new_zeros(0, self.hidden_size)
