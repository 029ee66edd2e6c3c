"""The fused LM head + loss (model/lm_loss.py) on CUDA: the same loss and gradients as
F.cross_entropy on the materialised logits, and peak memory bounded by one chunk of logits.

At a Mixtral-size vocabulary (32000) and 8192 tokens the plain path needs several 1 GiB fp32 [N, V]
tensors; the fused one a 64 MiB chunk. Tolerances: relative L2 error <= 1e-5 (fp32, TF32 off),
<= 2e-2 (bf16: logits rounded to bf16 before the fp32 softmax on both paths, GEMMs in other orders).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.model.lm_loss import default_chunk_rows, linear_cross_entropy

from ._gpu import rel_err, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]

N, H, V = 8192, 512, 32000
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(V, H, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    labels[::7] = -100
    return h, w, labels


def _peak_above(fn) -> tuple[torch.Tensor, int]:
    """fn's result and the most memory it held at once above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_matches_cross_entropy_and_holds_one_chunk(dtype):
    h, w, labels = _inputs(dtype)

    def plain():
        loss = F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100)
        loss.backward()
        return loss.detach()

    def fused():
        loss = linear_cross_entropy(h, w, labels)
        loss.backward()
        return loss.detach()

    ref_loss, plain_peak = _peak_above(plain)
    ref_dh, ref_dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, fused_peak = _peak_above(fused)

    assert rel_err(loss, ref_loss) <= TOL[dtype]
    assert rel_err(h.grad, ref_dh) <= TOL[dtype]
    assert rel_err(w.grad, ref_dw) <= TOL[dtype]
    # Fused: a few [chunk, V] fp32 buffers plus dh [N, H] and an fp32 dW [V, H] (and the .grad it
    # becomes); plain: at least two fp32 [N, V] tensors (the logits' fp32 copy and its gradient).
    chunk = default_chunk_rows(V)
    bound = 4 * chunk * V * 4 + N * H * 4 + 2 * V * H * 4
    assert fused_peak <= bound, (fused_peak, bound)
    assert plain_peak >= 2 * N * V * 4, plain_peak
