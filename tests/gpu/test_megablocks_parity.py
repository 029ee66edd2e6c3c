"""The megablocks backend equals the torch backend on CUDA: output, router losses, gradients.

Same parameters (loaded from the torch layer's state dict), same input, same upstream gradient.
bf16 runs MegaBlocks' grouped GEMM (grouped_gemm is bf16-only); fp32 runs MegaBlocks' permute
kernels with torch GEMMs. Tolerances: relative L2 error <= 1e-2 (bf16), <= 1e-5 (fp32).
"""

from __future__ import annotations

import pytest
import torch

import moetrain.moe.megablocks_backend as mbb
from moetrain.config import MoEConfig
from moetrain.moe import MoELayer, load_balancing_loss, router_z_loss

from ._gpu import rel_err, requires_megablocks

pytestmark = [pytest.mark.gpu, requires_megablocks]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
H, F, E, K = 256, 512, 8, 2


def _pair(dtype: torch.dtype, **moe) -> tuple[MoELayer, MoELayer]:
    torch.manual_seed(0)
    ref = MoELayer(H, F, E, K, MoEConfig(backend="torch", **moe))
    with torch.no_grad():
        ref.router.gate.weight.normal_(0.0, 0.05)
        for p in (ref.experts.w1, ref.experts.v1, ref.experts.w2):
            p.normal_(0.0, 0.02)
    mb = MoELayer(H, F, E, K, MoEConfig(backend="megablocks", **moe))
    assert mb.moe_backend == "megablocks" and isinstance(mb.experts, mbb.MegaBlocksExperts)
    mb.load_state_dict(ref.state_dict(), strict=True)
    return ref.to("cuda", dtype), mb.to("cuda", dtype)


def _run(layer: MoELayer, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out, stats = layer(x)
    aux = load_balancing_loss([stats], E, K, "switch")
    z = router_z_loss([stats])
    ((out.float() * g).sum() + 0.01 * aux + 0.001 * z).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    grads["input"] = x.grad
    return out, stats, aux, z, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity_factor", [None, 1.25], ids=["dropless", "capacity"])
def test_megablocks_equals_torch(dtype, capacity_factor):
    ref, mb = _pair(dtype, capacity_factor=capacity_factor)
    torch.manual_seed(1)
    x = torch.randn(4, 128, H, device="cuda", dtype=dtype)
    g = torch.randn(4, 128, H, device="cuda")
    out_r, st_r, aux_r, z_r, gr_r = _run(ref, x, g)
    out_m, st_m, aux_m, z_m, gr_m = _run(mb, x, g)
    tol = TOL[dtype]
    assert out_m.dtype == out_r.dtype == dtype
    assert rel_err(out_m, out_r) <= tol
    # the router is shared code: identical routing, counts and loss terms
    assert torch.equal(st_m.tokens_per_expert_E, st_r.tokens_per_expert_E)
    assert st_m.num_dropped == st_r.num_dropped
    torch.testing.assert_close(aux_m, aux_r, rtol=1e-6, atol=0)
    torch.testing.assert_close(z_m, z_r, rtol=1e-6, atol=0)
    assert set(gr_m) == set(gr_r)
    for name in gr_r:
        assert gr_m[name] is not None, name
        assert rel_err(gr_m[name], gr_r[name]) <= tol, (name, rel_err(gr_m[name], gr_r[name]))


def test_bf16_uses_grouped_gemm_on_our_parameters_without_copies(monkeypatch):
    _, mb = _pair(torch.bfloat16)
    real = mbb._gmm()
    seen: list[tuple[int, tuple[int, ...]]] = []

    def spy(a, b, batch_sizes, trans_b=False):
        seen.append((b.data_ptr(), tuple(b.shape)))
        assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64
        return real(a, b, batch_sizes, trans_b=trans_b)

    monkeypatch.setattr(mbb, "_gmm", lambda: spy)
    x = torch.randn(2, 64, H, device="cuda", dtype=torch.bfloat16)
    out, _ = mb(x)
    out.float().sum().backward()
    ptrs = {mb.experts.w1.data_ptr(), mb.experts.v1.data_ptr(), mb.experts.w2.data_ptr()}
    assert len(seen) == 3 and {p for p, _ in seen} == ptrs  # the parameters themselves
    assert all(shape == (E, F, H) for _, shape in seen)


def test_megablocks_global_loss_lists_stay_empty():
    """We never call MegaBlocks' router or ParallelMLP.forward, so its module-level lists stay empty."""
    from megablocks.layers import moe as mb_moe
    from megablocks.layers import router as mb_router

    mb_moe.clear_load_balancing_loss()
    _, mb = _pair(torch.bfloat16)
    mb.train()
    for _ in range(2):  # e.g. gradient accumulation
        out, _ = mb(torch.randn(2, 32, H, device="cuda", dtype=torch.bfloat16))
        out.float().sum().backward()
    assert len(mb_moe.get_load_balancing_loss()) == 0
    assert len(mb_router._ROUTER_LOGITS) == 0


def test_state_dict_round_trip_on_cuda():
    ref, mb = _pair(torch.bfloat16)
    assert list(ref.state_dict()) == list(mb.state_dict())
    back = MoELayer(H, F, E, K, MoEConfig(backend="torch")).to("cuda", torch.bfloat16)
    back.load_state_dict(mb.state_dict(), strict=True)
    x = torch.randn(1, 16, H, device="cuda", dtype=torch.bfloat16)
    assert rel_err(back(x)[0], ref(x)[0]) <= 1e-6
