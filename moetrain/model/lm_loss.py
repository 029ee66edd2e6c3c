"""The language-model loss fused with the LM head: cross-entropy of ``h @ W^T`` without the [N, V] logits.

The plain path (``F.cross_entropy(lm_head(h).float(), labels)``) writes the logits, their fp32 copy
(half-precision models), the log-softmax, and in backward the logits' gradient: several [N, V] tensors,
each a full pass through memory. With a large vocabulary they are the biggest activations of the model
(a Mixtral-size 32k vocabulary at 8 x 4096 tokens: 4.2 GB per fp32 [N, V] tensor) and, in small
models, a large part of the step's time (the LM head is a third of mixtral_small's active FLOPs).

Here the tokens go through in chunks of ``chunk_rows``: per chunk the logits, their log-softmax (the
very kernel ``F.cross_entropy`` uses, so each token's loss is computed the same way), the chunk's
loss, and, when gradients are wanted, at once the logits' gradient ``softmax - onehot`` (in place) and
from it the chunk's input gradient and its share of the weight gradient. Only one [chunk_rows, V]
buffer is ever live; the backward just scales the saved input and weight gradients by the incoming
gradient / n (Liger-Kernel's FusedLinearCrossEntropy computes the gradients in the forward the same
way: https://github.com/linkedin/Liger-Kernel).

Half-precision models: the logits are computed in the model dtype and upcast per chunk, as the plain
path does; the weight gradient is summed over chunks in fp32 and rounded once at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Tokens per chunk: about 16M logits (64 MiB in fp32), at least 512 rows. Large on purpose: a chunk's
# GEMMs lose efficiency as it shrinks (the weight gradient's reduction runs over its rows). Inside
# mixtral_small's training step (2048 tokens per micro-batch, V 8192, fp32, 2 threads) 256-row chunks
# made the step 4% slower than the plain path, one 2048-row chunk within 2.5% of it either way
# (benchmarks/results/lm_loss_fused_epyc-avx2_2026-12-03.md).
# Smaller chunks save more memory (a 40-step mixtral_small run peaked at 1180 MiB with 256 rows, 1292
# with 2048, 1429 unfused): one [chunk, V] buffer instead of several [N, V] tensors.
CHUNK_LOGITS = 1 << 24
MIN_CHUNK_ROWS = 512


def default_chunk_rows(vocab_size: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_LOGITS // max(1, vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH, weight_VH, labels_N, ignore_index: int, chunk_rows: int, want_grad: bool):  # type: ignore[override]
        N = h_NH.shape[0]
        valid_N1 = (labels_N != ignore_index).unsqueeze(1)
        targets_N1 = torch.where(valid_N1, labels_N.unsqueeze(1), 0)
        # mean over the non-ignored tokens, as F.cross_entropy (0 / 0 = nan when every token is ignored)
        n_valid = valid_N1.sum().float()
        nll_sum = torch.zeros((), dtype=torch.float32, device=h_NH.device)
        one_chunk = chunk_rows >= N
        dh_NH = torch.empty_like(h_NH) if want_grad else None
        dW_VH = None
        if want_grad and not one_chunk:  # summed over chunks in fp32, rounded once at the end
            dW_VH = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device)
        for start in range(0, N, chunk_rows):
            end = min(N, start + chunk_rows)
            h_CH, valid_C1, target_C1 = h_NH[start:end], valid_N1[start:end], targets_N1[start:end]
            logp_CV = F.log_softmax(torch.mm(h_CH, weight_VH.t()).float(), dim=-1)
            nll_sum -= (logp_CV.gather(1, target_C1) * valid_C1).sum()
            if not want_grad:
                continue
            # n * d loss / d logits = softmax - onehot(target) on valid rows, built in place. Ignored
            # rows are zeroed through [C, H] tensors (their h for the weight gradient, their dh after),
            # not by another pass over [C, V]; the 1 / n goes into backward's scaling.
            grad_CV = logp_CV.exp_()
            grad_CV.scatter_add_(1, target_C1, torch.full_like(target_C1, -1.0, dtype=grad_CV.dtype))
            grad_CV = grad_CV.to(weight_VH.dtype)
            dh_CH = torch.mm(grad_CV, weight_VH, out=dh_NH[start:end])
            dh_CH.mul_(valid_C1)
            masked_h_CH = h_CH * valid_C1
            if one_chunk:
                dW_VH = torch.mm(grad_CV.t(), masked_h_CH)
            elif dW_VH.dtype == grad_CV.dtype:
                dW_VH.addmm_(grad_CV.t(), masked_h_CH)
            else:
                dW_VH += torch.mm(grad_CV.t(), masked_h_CH)
        if want_grad:
            ctx.save_for_backward(dh_NH, dW_VH, n_valid)
        ctx.weight_dtype = weight_VH.dtype
        return nll_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        dh_NH, dW_VH, n_valid = ctx.saved_tensors
        scale = grad_loss.float() / n_valid
        grad_h = grad_w = None
        # not in place: a backward may run twice (retain_graph)
        if ctx.needs_input_grad[0]:
            grad_h = dh_NH * scale.to(dh_NH.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (dW_VH * scale.to(dW_VH.dtype)).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    h_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy((h_NH @ weight_VH.T).float(), labels_N, ignore_index=ignore_index)`` (mean over
    the non-ignored tokens, fp32) without materialising the [N, V] logits. Differentiable in ``h_NH``
    and ``weight_VH``; the gradients are computed in the forward, so call it once per backward."""
    if h_NH.dim() != 2 or labels_N.shape != h_NH.shape[:1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h_NH.shape)} and labels {tuple(labels_N.shape)}")
    rows = chunk_rows or default_chunk_rows(weight_VH.shape[0])
    want_grad = torch.is_grad_enabled() and (h_NH.requires_grad or weight_VH.requires_grad)
    return _LinearCrossEntropy.apply(
        h_NH.contiguous(), weight_VH, labels_N.contiguous(), ignore_index, rows, want_grad
    )


class LMHead(nn.Linear):
    """The output projection: ``head(h)`` gives logits, ``head(h, labels)`` the fused loss
    (:func:`linear_cross_entropy`). One module owns the weight for both uses, so wrappers that gather
    a weight in its module's hooks (DeepSpeed ZeRO-3, FSDP) find it used inside its own forward."""

    def forward(  # type: ignore[override]
        self, h: torch.Tensor, labels: torch.Tensor | None = None, chunk_rows: int | None = None
    ) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, labels, ignore_index=-100, chunk_rows=chunk_rows)
