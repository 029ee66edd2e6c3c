"""Backend selection (auto | torch | megablocks) and the parameter layout shared with MegaBlocks.

Runs on CPU. The CUDA path itself is tested in tests/gpu/ (``make test-gpu``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys

import pytest
import torch

import moetrain.moe.layer as layer_mod
from moetrain.config import ConfigError, ModelConfig, MoEConfig
from moetrain.moe import MoELayer, backends
from moetrain.moe.backends import resolve_backend
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.megablocks_backend import (
    MegaBlocksExperts,
    megablocks_weight_views,
    state_dict_from_megablocks,
)
from moetrain.testing import assert_close_scaled, rounding_rel

FIX = (
    "fix: `pip install -e .[gpu]` on a CUDA host or use the Docker image in docker/ "
    "(docker/README.md), or set model.moe.backend=torch"
)
PREFIX = "model.moe.backend='megablocks' cannot run here: "


@pytest.fixture(autouse=True)
def _fresh_probe():
    backends._extension_import_error.cache_clear()
    yield
    backends._extension_import_error.cache_clear()


@pytest.fixture
def cuda_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def _find_spec_without(monkeypatch, missing: str | None, fake_present: tuple[str, ...] = ()):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name == missing:
            return None
        if name in fake_present:
            return importlib.machinery.ModuleSpec(name, loader=None)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


# ---- selection ------------------------------------------------------------------------------------
def test_torch_is_always_torch(cuda_present):
    assert resolve_backend("torch") == "torch"


def test_auto_is_torch_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto") == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real CPU host")
def test_auto_is_torch_on_this_cpu_host():
    assert resolve_backend("auto") == "torch"
    assert MoELayer(8, 16, 4, 2, MoEConfig()).moe_backend == "torch"


def test_auto_is_torch_with_cuda_but_no_megablocks(monkeypatch, cuda_present):
    _find_spec_without(monkeypatch, "megablocks")
    assert resolve_backend("auto") == "torch"


def test_megablocks_without_cuda_is_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        resolve_backend("megablocks")
    msg = str(e.value)
    assert msg == PREFIX + "no CUDA device is available (torch.cuda.is_available() is False); " + FIX
    assert "\n" not in msg


def test_megablocks_with_cuda_but_not_installed(monkeypatch, cuda_present):
    _find_spec_without(monkeypatch, "megablocks")
    with pytest.raises(ConfigError) as e:
        resolve_backend("megablocks")
    assert str(e.value) == PREFIX + "megablocks is not installed; " + FIX


def test_megablocks_installed_but_extension_broken(monkeypatch, cuda_present):
    """megablocks present (e.g. `pip install --no-deps`) but its compiled megablocks_ops missing."""
    _find_spec_without(monkeypatch, None, fake_present=("megablocks",))
    monkeypatch.setitem(sys.modules, "megablocks_ops", None)  # makes `import megablocks_ops` fail
    with pytest.raises(ConfigError) as e:
        resolve_backend("megablocks")
    msg = str(e.value)
    assert msg.startswith(PREFIX + "its CUDA extension failed to import: ModuleNotFoundError: ")
    assert "megablocks_ops" in msg and msg.endswith("; " + FIX) and "\n" not in msg
    # auto falls back to torch, with a warning naming the reason
    with pytest.warns(UserWarning, match="its CUDA extension failed to import"):
        assert resolve_backend("auto") == "torch"


def test_megablocks_error_comes_at_model_construction(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="cannot run here: no CUDA device"):
        MoELayer(8, 16, 4, 2, MoEConfig(backend="megablocks"))
    from moetrain.model.transformer import MoETransformer

    cfg = ModelConfig(
        vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, ffn_hidden_size=16
    )
    cfg.moe.backend = "megablocks"
    with pytest.raises(ConfigError, match="cannot run here"):
        MoETransformer(cfg)


def test_invalid_backend():
    with pytest.raises(ConfigError, match="model.moe.backend='cuda' is invalid"):
        resolve_backend("cuda")


def test_backend_modules_do_not_import_megablocks():
    """megablocks does not import on CPU hosts: importing our modules and running the torch backend
    must not touch it (a None entry in sys.modules makes any such import raise)."""
    code = (
        "import sys; sys.modules['megablocks'] = None; sys.modules['megablocks_ops'] = None\n"
        "import torch\n"
        "from moetrain.config import MoEConfig\n"
        "import moetrain.moe.backends, moetrain.moe.megablocks_backend\n"
        "from moetrain.moe import MoELayer\n"
        "layer = MoELayer(8, 16, 4, 2, MoEConfig(backend='torch'))\n"
        "out, _ = layer(torch.randn(1, 3, 8)); out.sum().backward(); print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ---- layout: our [E, F, H] parameters are MegaBlocks' [E*F, H] weights, by views ---------------
# MegaBlocks (databricks/megablocks 78eea65), megablocks/layers/mlp.py, SparseMLP.__init__:
#     self._num_rows_per_rank = mpu.experts_per_rank(args) * mpu.features_per_rank(args)
#     self.w1 = torch.nn.Parameter(torch.empty(self._num_rows_per_rank, args.hidden_size, ...))
#     self.w2 = torch.nn.Parameter(torch.empty(self._num_rows_per_rank, args.hidden_size, ...))
# create_dmoe_expert_weights: master_weights = torch.empty(num_experts, ffn_hidden_size, hidden_size)
#     ...; return weights.view([-1, columns])          # expert e = rows e*ffn:(e+1)*ffn
# megablocks/layers/glu.py, GroupedGLU.forward:
#     w1 = w1.view(ne, -1, self.args.hidden_size)  (v1, w2 likewise)
#     x1 = gg.ops.gmm(x, w1, batch_sizes, trans_b=True)     # x @ w1[e].T
#     x2 = gg.ops.gmm(x, v1, batch_sizes, trans_b=True)     # x @ v1[e].T
#     x1 = self.args.activation_fn(x1) * x2
#     return gg.ops.gmm(x1, w2, batch_sizes)                # h @ w2[e]
E, F_, H = 4, 6, 8


def _experts() -> GroupedExperts:
    torch.manual_seed(0)
    ex = GroupedExperts(E, H, F_, impl="loop")
    with torch.no_grad():
        for p in (ex.w1, ex.v1, ex.w2):
            p.normal_(0.0, 0.3)
    return ex


def test_megablocks_views_share_storage():
    ex = _experts()
    views = megablocks_weight_views(ex)
    for name, v in views.items():
        p = getattr(ex, name)
        assert p.shape == (E, F_, H) and p.is_contiguous()
        assert v.shape == (E * F_, H) and v.stride() == (H, 1)
        assert v.data_ptr() == p.data_ptr()  # no copy
        assert v.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
        for e in range(E):  # expert e occupies rows e*F:(e+1)*F
            assert torch.equal(v[e * F_ : (e + 1) * F_], p[e])
            assert v[e * F_ : (e + 1) * F_].data_ptr() == p[e].data_ptr()
        # GroupedGLU's view back to 3-D is our parameter, byte for byte
        back = v.view(E, -1, H)
        assert back.shape == p.shape and back.stride() == p.stride() and back.data_ptr() == p.data_ptr()
    # the views are the parameters: an in-place update of one shows in the other
    with torch.no_grad():
        views["w2"][F_ + 1, 3] = 7.0
    assert ex.w2[1, 1, 3].item() == 7.0


def test_megablocks_glu_math_on_views_equals_our_experts():
    """GroupedGLU's three GEMMs, written as a loop over its 3-D views, give our experts' output."""
    ex = _experts()
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts.sum()), H)
    views = {n: v.view(E, -1, H) for n, v in megablocks_weight_views(ex).items()}
    outs = []
    for e, x_e in enumerate(torch.split(x, counts.tolist())):
        x1 = x_e @ views["w1"][e].T  # gmm(x, w1, trans_b=True)
        x2 = x_e @ views["v1"][e].T  # gmm(x, v1, trans_b=True)
        outs.append((torch.nn.functional.silu(x1) * x2) @ views["w2"][e])  # gmm(x1, w2)
    # the loop implementation runs exactly these three products per expert on the same views: exact
    assert ex.resolved_impl(x.dtype) == "loop"
    torch.testing.assert_close(torch.cat(outs), ex(x, counts), rtol=0, atol=0)


def test_state_dict_from_megablocks():
    """A MegaBlocks dMoE (GLU) state dict maps onto MoELayer's keys by views."""
    torch.manual_seed(1)
    master = {n: torch.randn(E, F_, H) for n in ("w1", "v1", "w2")}  # create_dmoe_expert_weights
    mb_sd = {f"experts.mlp.{n}": w.view(-1, H) for n, w in master.items()}
    mb_sd["router.layer.weight"] = torch.randn(E, H)
    ours = state_dict_from_megablocks(mb_sd, E)
    for n in ("w1", "v1", "w2"):
        assert ours[f"experts.{n}"].data_ptr() == mb_sd[f"experts.mlp.{n}"].data_ptr()
    layer = MoELayer(H, F_, E, 2, MoEConfig(backend="torch"))
    layer.load_state_dict(ours, strict=True)
    for n, w in master.items():
        assert torch.equal(getattr(layer.experts, n), w)
    assert torch.equal(layer.router.gate.weight, mb_sd["router.layer.weight"])


def test_state_dict_from_megablocks_refuses_what_it_cannot_hold():
    """A dMoE with an expert bias, or trained with MegaBlocks' default GELU, would load into a layer
    computing another function: one-line refusal naming the reason, never a silent drop."""
    mb_sd = {f"experts.mlp.{n}": torch.zeros(E * F_, H) for n in ("w1", "v1", "w2")}
    mb_sd["router.layer.weight"] = torch.zeros(E, H)
    with pytest.raises(ValueError, match="activation='gelu'"):
        state_dict_from_megablocks(mb_sd, E, activation="gelu")
    with pytest.raises(ValueError, match=r"cannot hold: \['experts.bias'\]"):
        state_dict_from_megablocks({**mb_sd, "experts.bias": torch.zeros(H)}, E)


# ---- checkpoints are backend-independent ----------------------------------------------------------
def _megablocks_layer_on_cpu(monkeypatch, **moe) -> MoELayer:
    """Construction needs no CUDA; only resolve_backend refuses on CPU, so bypass it here."""
    monkeypatch.setattr(layer_mod, "resolve_backend", lambda requested: "megablocks")
    return MoELayer(H, F_, E, 2, MoEConfig(backend="megablocks", **moe))


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_checkpoint_torch_to_megablocks_and_back(monkeypatch, capacity_factor):
    torch.manual_seed(0)
    t_layer = MoELayer(H, F_, E, 2, MoEConfig(backend="torch", capacity_factor=capacity_factor))
    with torch.no_grad():
        for p in t_layer.parameters():
            p.normal_(0.0, 0.3)
    m_layer = _megablocks_layer_on_cpu(monkeypatch, capacity_factor=capacity_factor)
    assert isinstance(m_layer.experts, MegaBlocksExperts) and m_layer.moe_backend == "megablocks"
    sd = t_layer.state_dict()
    assert list(sd) == list(m_layer.state_dict())  # same names, same order
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in m_layer.state_dict().items()}
    m_layer.load_state_dict(sd, strict=True)
    # CPU tensors take the torch kernels inside the megablocks backend (the same operations on the
    # same shapes): identical results, bit for bit
    x = torch.randn(2, 5, H)
    out_t, st_t = t_layer(x)
    out_m, st_m = m_layer(x)
    assert torch.equal(out_t, out_m)
    assert torch.equal(st_t.tokens_per_expert_E, st_m.tokens_per_expert_E)
    # and back
    t2 = MoELayer(H, F_, E, 2, MoEConfig(backend="torch", capacity_factor=capacity_factor))
    t2.load_state_dict(m_layer.state_dict(), strict=True)
    assert torch.equal(t2(x)[0], out_t)


# ---- the glue around MegaBlocks' kernels, with CPU stand-ins ---------------------------------------
class _FakeMegaBlocksOps:
    """Pure-torch stand-ins with the semantics of megablocks.ops (megablocks/backend/kernels.py):
    gather: program i copies row ``indices[i] // top_k`` of x to row i (A_TO_B, no padding);
    scatter: row i of x, times ``weights[indices[i]]``, goes to slot ``indices[i]`` of a
    [tokens, top_k, H] buffer, which is then summed over top_k."""

    @staticmethod
    def sort(x, end_bit):
        values, idx = torch.sort(x, stable=True)  # CUB radix sort is stable
        return values, idx.int()

    @staticmethod
    def histogram(x, num_bins):
        return torch.bincount(x, minlength=num_bins).int()

    @staticmethod
    def inclusive_cumsum(x, dim):
        return torch.cumsum(x, dim).int()

    @staticmethod
    def gather(x, indices, bin_ids, bins, top_k):
        return x[indices.long() // top_k]

    @staticmethod
    def scatter(x, indices, bin_ids, weights, bins, top_k):
        idx = indices.long()
        rows = x * weights[idx].unsqueeze(-1)
        buf = torch.zeros(indices.numel(), x.shape[1], dtype=x.dtype).index_copy(0, idx, rows)
        return buf.view(-1, top_k, x.shape[1]).sum(1)


def _fake_gmm(a, b, batch_sizes, trans_b=False):
    assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64
    assert b.is_contiguous() and b.dim() == 3
    outs = [x_e @ (b[e].T if trans_b else b[e]) for e, x_e in enumerate(torch.split(a, batch_sizes.tolist()))]
    return torch.cat(outs)


@pytest.mark.numerics
@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_forward_glue_matches_torch_backend(monkeypatch, top_k):
    import moetrain.moe.megablocks_backend as mbb
    from moetrain.moe.layer import LocalExchange

    calls: list[int] = []

    def gmm(a, b, batch_sizes, trans_b=False):
        calls.append(b.data_ptr())
        return _fake_gmm(a, b, batch_sizes, trans_b)

    monkeypatch.setattr(mbb, "_mb_ops", lambda: _FakeMegaBlocksOps)
    monkeypatch.setattr(mbb, "_gmm", lambda: gmm)
    monkeypatch.setattr(mbb, "uses_grouped_gemm", lambda x, w: x.shape[0] > 0)
    torch.manual_seed(0)
    ref = MoELayer(H, F_, E, top_k, MoEConfig(backend="torch"))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    mb = _megablocks_layer_on_cpu(monkeypatch)
    mb.top_k = mb.router.top_k = top_k
    mb.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, H)
    g = torch.randn(3 * 7, H)

    x_ref = x.clone().requires_grad_(True)
    out_ref, st_ref = ref(x_ref)
    (out_ref.reshape(-1, H) * g).sum().backward()

    x_mb = x.clone().requires_grad_(True)
    routing = mb.router(x_mb.reshape(-1, H))
    out_mb, counts = mbb.dropless_forward(
        x_mb.reshape(-1, H), routing.expert_ids_NK, routing.weights_NK, E, LocalExchange(), mb.experts
    )
    (out_mb * g).sum().backward()

    assert calls == [mb.experts.w1.data_ptr(), mb.experts.v1.data_ptr(), mb.experts.w2.data_ptr()]
    assert torch.equal(counts.float(), st_ref.tokens_per_expert_E)
    # the same products; MegaBlocks' glue gathers, scatters and sums the top-k copies in another order
    # (and the stand-in GEMM is a loop): 16 ulps of the size of the terms, the layer's largest output
    # or gradient (a gradient can cancel to ~0: with top-1 the renormalised weight is 1 whatever the
    # gate, see REF_REL in test_dropless.py). A wrong permutation or weight is off by O(1).
    rel = rounding_rel(16)
    pairs = [("output", out_mb, out_ref.reshape(-1, H)), ("input grad", x_mb.grad, x_ref.grad)]
    for (n, p_ref), (n2, p_mb) in zip(ref.named_parameters(), mb.named_parameters()):
        assert n == n2
        pairs.append((f"grad of {n}", p_mb.grad, p_ref.grad))
    scale = max(want.abs().max().item() for _, _, want in pairs)
    for name, got, want in pairs:
        assert_close_scaled(got, want, name, rel=rel, scale=scale)
