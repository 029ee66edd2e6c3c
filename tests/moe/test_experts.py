"""grouped_mm and loop expert kernels agree (forward and grads), including empty and overfull experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetrain.moe import experts as experts_module
from moetrain.moe.experts import GroupedExperts, default_row_block, onednn_runs_cpu_gemm, padded_rows
from moetrain.testing import assert_close_scaled, rounding_rel

from ._reference import swiglu_expert

pytestmark = pytest.mark.skipif(
    not hasattr(torch.nn.functional, "grouped_mm"), reason="torch lacks grouped_mm"
)

H, F = 16, 24  # 16-byte rows in fp32 and bf16

COUNTS = {
    "spread": [3, 5, 2, 6],
    "zeros_between": [4, 0, 7, 0],
    "zeros_at_ends": [0, 6, 5, 0],
    "all_to_first": [11, 0, 0, 0],
    "all_to_last": [0, 0, 0, 11],
    "all_to_middle": [0, 0, 9, 0],
    "single_expert_model": [7],
}
# grouped_mm and the loop of mm run the same products per expert, possibly blocked and summed in
# another order; both accumulate in fp32 and round the result to the dtype once. Each tensor (output,
# input grad, weight grads) may differ by 16 fp32 ulps of its scale, or by 2 bf16 ulps (2 x 7.8e-3)
# where the results are stored in bf16. A wrong expert offset or a missing row is off by O(1).
KERNEL_REL = {torch.float32: rounding_rel(16), torch.bfloat16: rounding_rel(2, torch.bfloat16)}


def run(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, g: torch.Tensor | None):
    for p in experts.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    out = experts(x, counts)
    (out.sum() if g is None else (out * g).sum()).backward()  # out.sum(): a broadcast (stride-0) grad
    return out, x.grad, {n: p.grad.clone() for n, p in experts.named_parameters()}


def make_experts(E: int, dtype: torch.dtype) -> GroupedExperts:
    experts = GroupedExperts(E, H, F, impl="loop")
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.3)
    return experts.to(dtype)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(COUNTS))
@pytest.mark.parametrize("broadcast_grad", [False, True])
def test_grouped_mm_matches_loop(seed, dtype, case, broadcast_grad):
    counts = torch.tensor(COUNTS[case])
    experts = make_experts(len(counts), dtype)
    x = torch.randn(int(counts.sum()), H, dtype=dtype)
    g = None if broadcast_grad else torch.randn(x.shape[0], H, dtype=dtype)

    experts.impl = "loop"
    out_loop, gx_loop, gp_loop = run(experts, x, counts, g)
    experts.impl = "grouped_mm"
    out_gmm, gx_gmm, gp_gmm = run(experts, x, counts, g)

    assert out_gmm.dtype == dtype and out_gmm.shape == (x.shape[0], H)
    assert_same_results((out_gmm, gx_gmm, gp_gmm), (out_loop, gx_loop, gp_loop), dtype, COUNTS[case])


def assert_same_results(got, want, dtype: torch.dtype, counts: list[int]) -> None:
    """Output, input grad and weight grads agree within KERNEL_REL; experts that received no tokens
    get exactly zero gradient (nothing is ever added to it)."""
    (out, gx, gp), (out_ref, gx_ref, gp_ref) = got, want
    rel = KERNEL_REL[dtype]
    assert_close_scaled(out, out_ref, "output", rel=rel)
    assert_close_scaled(gx, gx_ref, "input grad", rel=rel)
    for name in gp_ref:
        assert_close_scaled(gp[name], gp_ref[name], f"grad of {name}", rel=rel)
        for e, c in enumerate(counts):
            if c == 0:
                assert torch.count_nonzero(gp[name][e]) == 0, (name, e)


@pytest.mark.numerics
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_kernels_match_plain_matmul_reference_fp32(seed, impl):
    counts = [4, 0, 3, 5]
    experts = make_experts(len(counts), torch.float32)
    experts.impl = impl
    x = torch.randn(sum(counts), H)
    g = torch.randn(sum(counts), H)
    out, gx, gp = run(experts, x, torch.tensor(counts), g)

    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in experts.named_parameters()}
    xr = x.clone().requires_grad_(True)
    rows, start = [], 0
    for e, c in enumerate(counts):
        for i in range(start, start + c):
            rows.append(swiglu_expert(xr[i], ref_params["w1"][e], ref_params["v1"][e], ref_params["w2"][e]))
        start += c
    ref = torch.stack(rows)
    (ref * g).sum().backward()

    # one matrix-vector product per row vs batched GEMMs: the same sums in another order (fp32)
    rel = KERNEL_REL[torch.float32]
    assert_close_scaled(out, ref, "output", rel=rel)
    assert_close_scaled(gx, xr.grad, "input grad", rel=rel)
    for n, p in ref_params.items():
        assert_close_scaled(gp[n], p.grad, f"grad of {n}", rel=rel)


@pytest.mark.numerics
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_bf16_kernels_close_to_fp32(seed, impl):
    counts = torch.tensor([5, 0, 6, 3])
    experts32 = make_experts(4, torch.float32)
    experts16 = make_experts(4, torch.float32)
    experts16.load_state_dict(experts32.state_dict())
    experts16 = experts16.to(torch.bfloat16)
    experts32.impl = experts16.impl = impl
    x = torch.randn(14, H)
    out32 = experts32(x, counts)
    out16 = experts16(x.bfloat16(), counts)
    # bf16 rounds inputs, weights and the two intermediate products (each by <= 1/2 ulp = 3.9e-3
    # relative) before three GEMMs accumulate them: a few bf16 ulps of the output's scale; allowed 4
    # (3.1e-2). Computing in the wrong dtype altogether (e.g. fp16 overflow, an fp32 expert skipped)
    # would be O(1) off.
    assert_close_scaled(out16.float(), out32, "bf16 vs fp32 output", rel=rounding_rel(4, torch.bfloat16))


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_tokens_at_all(impl, dtype):
    """An expert-parallel rank may receive zero tokens: empty output, zero (not missing) weight grads."""
    experts = make_experts(4, dtype)
    experts.impl = impl
    x = torch.zeros(0, H, dtype=dtype, requires_grad=True)
    out = experts(x, torch.zeros(4, dtype=torch.long))
    assert out.shape == (0, H) and out.dtype == dtype
    out.sum().backward()
    for name, p in experts.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("case", ["spread", "zeros_between", "all_to_last", "single_expert_model"])
def test_row_block_padding_changes_nothing(seed, dtype, impl, case):
    """Rows padded to a multiple of ``row_block`` (copies of row 0 that never reach the result):
    the same output and gradients as unpadded, and the GEMMs really saw padded row counts."""
    counts = torch.tensor(COUNTS[case])
    experts = make_experts(len(counts), dtype)
    experts.impl = impl
    x = torch.randn(int(counts.sum()), H, dtype=dtype)
    x[0] *= 50  # padding rows copy row 0: any leak into a weight gradient would be large
    g = torch.randn(x.shape[0], H, dtype=dtype)

    experts.row_block = 1
    out_ref, gx_ref, gp_ref = run(experts, x, counts, g)
    experts.row_block = 4
    seen = []
    compute = experts._compute
    experts._compute = lambda x_SH, c: (seen.append(c.tolist()), compute(x_SH, c))[1]
    out, gx, gp = run(experts, x, counts, g)

    assert seen == [[-(-c // 4) * 4 for c in COUNTS[case]]]
    assert_same_results((out, gx, gp), (out_ref, gx_ref, gp_ref), dtype, COUNTS[case])


def test_padded_rows_map_every_row_once():
    counts = torch.tensor([3, 0, 8, 1, 0])
    padded, dest_S, src_P = padded_rows(counts, 4)
    assert padded.tolist() == [4, 0, 8, 4, 0]
    assert dest_S.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert src_P.shape == (16,) and torch.equal(src_P[dest_S], torch.arange(12))
    pad_rows = [p for p in range(16) if p not in dest_S.tolist()]
    assert pad_rows == [3, 13, 14, 15] and src_P[pad_rows].tolist() == [0, 0, 0, 0]


def test_bf16_cpu_gemm_shapes_repeat_across_routings():
    """The point of row blocks: on CPU, bf16 GEMM kernels are compiled per shape (oneDNN), so expert
    row counts must come from a small set however the routing changes (moe/experts.py)."""
    block = default_row_block(torch.device("cpu"), torch.bfloat16)
    if block == 1:
        pytest.skip(
            "oneDNN does not run bf16 GEMMs here (no bf16 instructions or no oneDNN): nothing compiled per shape"
        )
    assert default_row_block(torch.device("cpu"), torch.float32) == 1  # MKL: nothing compiled per shape
    E, N, K = 8, 512, 2
    experts = GroupedExperts(E, H, F).to(torch.bfloat16)
    compute = experts._compute
    seen: dict[int | None, set[int]] = {None: set(), 1: set()}
    for row_block in seen:
        experts.row_block = row_block  # None: the default
        experts._compute = lambda x_SH, c, s=seen[row_block]: (s.update(c.tolist()), compute(x_SH, c))[1]
        gen = torch.Generator().manual_seed(0)
        for _ in range(30):
            counts = torch.bincount(torch.randn(N, E, generator=gen).topk(K).indices.flatten(), minlength=E)
            with torch.no_grad():
                experts(torch.randn(N * K, H).bfloat16(), counts)
    assert all(c % block == 0 for c in seen[None])
    # the same 30 routings unpadded: several times as many distinct row counts (kernels to compile)
    assert len(seen[1]) >= 3 * len(seen[None]), (len(seen[1]), len(seen[None]))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def test_onednn_query_matches_the_cpu():
    """The row-block default follows what this CPU can do: oneDNN takes bf16 GEMMs with AVX-512
    (BW, VL, DQ) and not on an x86 CPU without AVX-512 or AVX-NE-CONVERT (torch's own kernel)."""
    flags = _cpu_flags()
    if not flags or not torch.backends.mkldnn.is_available():
        pytest.skip("no /proc/cpuinfo flags (not Linux x86) or torch without oneDNN")
    assert not onednn_runs_cpu_gemm(torch.float32)
    if {"avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert onednn_runs_cpu_gemm(torch.bfloat16)
        assert default_row_block(torch.device("cpu"), torch.bfloat16) == 32
    elif "avx2" in flags and not flags & {"avx512bw", "avx_ne_convert", "amx_bf16"}:
        assert not onednn_runs_cpu_gemm(torch.bfloat16)
        assert default_row_block(torch.device("cpu"), torch.bfloat16) == 1
    with torch.backends.mkldnn.flags(enabled=False):
        assert not onednn_runs_cpu_gemm(torch.bfloat16)


def test_row_blocks_only_where_onednn_compiles_kernels(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(experts_module, "onednn_runs_cpu_gemm", lambda dtype: True)
    assert default_row_block(cpu, torch.bfloat16) == 32
    assert default_row_block(torch.device("cuda", 0), torch.bfloat16) == 1
    monkeypatch.setattr(experts_module, "onednn_runs_cpu_gemm", lambda dtype: False)
    assert default_row_block(cpu, torch.bfloat16) == 1
