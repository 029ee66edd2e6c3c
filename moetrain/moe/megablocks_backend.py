"""MegaBlocks backend: our router and parameters, MegaBlocks' dropless CUDA kernels.

Nothing of megablocks is imported at module import time (it does not import on CPU hosts); the
kernels are looked up on first use, after ``moetrain.moe.backends.resolve_backend`` has checked that
they can run.

What runs where (sources: databricks/megablocks ``megablocks/layers/{glu,mlp,moe,dmoe}.py`` at
78eea65, tgale96/grouped_gemm ``grouped_gemm/ops.py``, ``csrc/grouped_gemm.cu``):

- Router, ``RouterStats``, the load-balancing and z losses: ours, unchanged (``moe/router.py``,
  ``moe/losses.py``). MegaBlocks' ``LearnedRouter`` / ``ParallelMLP.forward`` are never called, so
  its module-level ``_LOAD_BALANCING_LOSS`` and ``_ROUTER_LOGITS`` lists are never appended to and
  need no clearing; activation recomputation and gradient accumulation cannot desynchronise them.
- Permutation (dropless, ``capacity_factor=None``): MegaBlocks' ``ops.sort`` (CUB radix sort, stable),
  ``ops.histogram``, ``ops.inclusive_cumsum``, ``ops.gather`` and ``ops.scatter`` (Triton), called
  exactly as ``ParallelMLP.indices_and_bins`` / ``ParallelDroplessMLP.grouped_permute_and_compute``
  do, but on our router's ``expert_ids`` / ``weights``. ``scatter`` applies the combine weights and
  returns their gradient (``scatter_wgrad``), so the router trains as with the torch combine.
  With a capacity factor our torch dispatch/combine keep the GShard drop order; only the GEMMs change.
- Experts: ``grouped_gemm.ops.gmm`` on views of our ``w1, v1, w2`` ([E, F, H], contiguous), the
  same three calls as MegaBlocks' ``GroupedGLU.forward``. MegaBlocks keeps each weight 2-D
  ``[E*F, H]`` and views it ``[E, F, H]`` before the GEMM; ours *are* that view, so no weight is
  copied or re-laid-out per step. grouped_gemm is bf16-only (``TORCH_CHECK(a.scalar_type() ==
  torch::kBFloat16)``), so fp32 (or CPU) tensors run the same parameters through the torch kernels.
- Expert parallelism: our ``AllToAllExchange`` (installed by ``moetrain.distributed.expert_parallel``)
  is kept; MegaBlocks computes only the local grouped GEMM. MegaBlocks' own EP path
  (``parallel_forward_once``) needs its ``Arguments``/``mpu`` state and own weight tensors, and scales
  expert gradients by ``1/ep_world_size`` (``SparseMLP.scale_grad``); DeepSpeed's engine already sums
  expert grads over the expert-data-parallel group and divides by the full DP world, so that scaling
  would be applied twice. We never call ``scale_grad`` nor set ``expert_model_parallel``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from moetrain.moe.experts import GroupedExperts

# ---- layout ---------------------------------------------------------------------------------------
# megablocks/layers/mlp.py, SparseMLP.__init__:
#     self._num_rows_per_rank = mpu.experts_per_rank(args) * mpu.features_per_rank(args)
#     self.w1 = torch.nn.Parameter(torch.empty(self._num_rows_per_rank, args.hidden_size, ...))
#     self.w2 = torch.nn.Parameter(torch.empty(self._num_rows_per_rank, args.hidden_size, ...))
# megablocks/layers/mlp.py, create_dmoe_expert_weights: master weights [num_experts, ffn, hidden],
#     ``return weights.view([-1, columns])``  -> expert e owns rows e*ffn:(e+1)*ffn
# megablocks/layers/glu.py, SparseGLU: ``self.v1`` the same shape as w1.
# megablocks/layers/glu.py, GroupedGLU.forward:
#     w1 = w1.view(ne, -1, self.args.hidden_size)          (likewise v1, w2)
#     x1 = gg.ops.gmm(x, w1, batch_sizes, trans_b=True)
#     x2 = gg.ops.gmm(x, v1, batch_sizes, trans_b=True)
#     x1 = self.args.activation_fn(x1) * x2
#     return gg.ops.gmm(x1, w2, batch_sizes)                -> out_e = h_e @ w2[e]   ([F, H])
MEGABLOCKS_WEIGHT_NAMES = ("w1", "v1", "w2")


def megablocks_weight_views(experts: GroupedExperts) -> dict[str, torch.Tensor]:
    """Our [E, F, H] parameters as MegaBlocks' 2-D ``[E*F, H]`` weights: views, same storage."""
    return {name: getattr(experts, name).view(-1, experts.hidden_size) for name in MEGABLOCKS_WEIGHT_NAMES}


def state_dict_from_megablocks(
    sd: dict[str, torch.Tensor],
    num_experts: int,
    *,
    activation: str = "silu",
) -> dict[str, torch.Tensor]:
    """A MegaBlocks ``dMoE`` (GLU, no bias) state dict -> one ``MoELayer``'s keys, by views only.

    ``router.layer.weight`` [E, H] -> ``router.gate.weight``;
    ``experts.mlp.{w1,v1,w2}`` [E*F, H] -> ``experts.{w1,v1,w2}`` [E, F, H].

    Our layer computes SiLU-gated experts with renormalised top-k weights. MegaBlocks' defaults are
    GELU (``Arguments.activation_fn``) and no renormalisation (``moe_normalize_expert_weights=None``):
    the caller states what the checkpoint was trained with, and anything our layer would compute
    differently (or any tensor it has no place for, such as ``experts.bias``) is refused in one line
    instead of loading into a different function. Routing normalisation is the layer's setting: build
    it with ``model.moe.normalize_top_k=false`` for a checkpoint trained with
    ``moe_normalize_expert_weights=None``."""
    if activation != "silu":
        raise ValueError(
            f"MegaBlocks checkpoint trained with activation={activation!r}: moetrain's experts are SiLU-gated "
            "(SwiGLU); converting it would change the model's function"
        )
    known = {"router.layer.weight"} | {f"experts.mlp.{n}" for n in MEGABLOCKS_WEIGHT_NAMES}
    unexpected = sorted(set(sd) - known)
    if unexpected:
        raise ValueError(f"MegaBlocks state dict has tensors moetrain's MoE layer cannot hold: {unexpected}")
    out = {"router.gate.weight": sd["router.layer.weight"]}
    for name in MEGABLOCKS_WEIGHT_NAMES:
        w = sd[f"experts.mlp.{name}"]
        out[f"experts.{name}"] = w.view(num_experts, -1, w.shape[-1])
    return out


# ---- lazily imported kernels ----------------------------------------------------------------------
def _mb_ops() -> Any:
    import megablocks.ops as ops  # noqa: PLC0415

    return ops


def _gmm() -> Any:
    from megablocks import grouped_gemm_util as gg  # noqa: PLC0415

    gg.assert_grouped_gemm_is_available()
    return gg.ops.gmm


def uses_grouped_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """grouped_gemm runs CUDA bf16 only; everything else takes the torch kernels."""
    return x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.shape[0] > 0


class MegaBlocksExperts(GroupedExperts):
    """``GroupedExperts`` (same parameters, names, init, checkpoints) whose GEMMs are MegaBlocks'."""

    def forward(self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        if not uses_grouped_gemm(x_SH, self.w1):
            return super().forward(x_SH, tokens_per_expert_E)
        gmm = _gmm()
        # grouped_gemm wants host int64 sizes (as GroupedGLU: tokens_per_expert.cpu().to(torch.long)).
        batch_sizes = tokens_per_expert_E.to(device="cpu", dtype=torch.int64)
        x_SH = x_SH.contiguous()
        # self.w1 is [E, F, H] contiguous == MegaBlocks' w1.view(ne, -1, hidden): no copy.
        x1 = gmm(x_SH, self.w1, batch_sizes, trans_b=True)
        x2 = gmm(x_SH, self.v1, batch_sizes, trans_b=True)
        return gmm(F.silu(x1) * x2, self.w2, batch_sizes)


def dropless_forward(
    x_NH: torch.Tensor,
    expert_ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
    num_experts: int,
    exchange: Any,
    experts: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MegaBlocks' grouped dropless permutation around ``exchange(x_SH, counts, experts)``.

    Returns the combined output [N, H] and the routed copies per (global) expert (int32, [E]).
    """
    ops = _mb_ops()
    K = expert_ids_NK.shape[1]
    top_experts = expert_ids_NK.reshape(-1).int()
    sort_end_bit = max(int(math.ceil(math.log2(num_experts))), 1)
    with torch.no_grad():  # ParallelMLP.indices_and_bins
        bin_ids, indices = ops.sort(top_experts, sort_end_bit)
        tokens_per_expert = ops.histogram(top_experts, num_experts)
        bins = ops.inclusive_cumsum(tokens_per_expert, 0)
        bins = bins.view(1) if not len(bins.size()) else bins
    # Copies sorted by global expert id (the same order as plan_dispatch's stable argsort), so the
    # expert-parallel exchange finds each rank's copies in one contiguous slice.
    x_SH = ops.gather(x_NH.contiguous(), indices, bin_ids, bins, K)
    y_SH = exchange(x_SH, tokens_per_expert, experts)
    out_NH = ops.scatter(y_SH.contiguous(), indices, bin_ids, weights_NK.reshape(-1), bins, K)
    return out_NH, tokens_per_expert
