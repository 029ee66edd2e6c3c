"""The whole MoE layer (router -> dispatch -> experts -> combine) vs a dense SwiGLU of equal active
FLOPs and vs peer implementations, forward + backward, interleaved step by step in one process.

Variants (each timed on the same input, in turn, every repeat: background load hits all alike; a new
input every repeat unless ``--fixed-inputs``, so routings and expert row counts change as in training):
- ``dense``: SwiGLU with ``F_dense = top_k * F`` (same active expert FLOPs; the router's E*H per
  token is extra for every MoE variant)
- ``moetrain``: ``MoELayer`` with grouped_mm experts; ``moetrain_loop``: the per-expert matmul loop;
  ``moetrain_unpadded``: grouped_mm without row blocks (``experts.row_block = 1``; see moe/experts.py)
- ``experts_only``: moetrain's grouped_mm experts alone on the N*k copies pre-sorted by expert (no
  router, dispatch or combine; with random loads, so it pads its own row blocks)
- ``gemms_only`` / ``gemms_dense``: the nine forward + backward GEMMs alone (``torch.mm``, no
  autograd, no elementwise work), per expert on equal row counts / for the dense twin: their ratio
  is the floor of any MoE layer that runs its experts as GEMMs per expert, on this machine
- ``gemms_replay`` / ``gemms_replay_dense``: every GEMM call of one forward + backward of the
  moetrain layer / the dense twin (router, grouped expert GEMMs at that round's row counts and
  padding, their backward), recorded untimed on a new input each round, then replayed alone, in
  order, on the recorded tensors. Their ratio is this layer's own GEMM floor: what it would cost
  against dense if everything but its GEMMs took no time
- ``routing_only``: the moetrain layer with the experts taken out (the copies go straight from the
  dispatch gather to the combine): router, dispatch plan with its row-block padding, gather, combine,
  routing statistics and all their backward, as the layer runs them. "sum of parts" per shape, per
  round: (``gemms_replay`` + ``routing_only`` + dense's own time outside its GEMMs) / dense: the
  layer's GEMMs, its routing and dispatch, and elementwise work as large as dense's (the layer's
  activation covers as many elements plus padding rows, its gradient accumulation more parameters).
  An estimate, not a bound: parts timed apart miss the caches they share inside the layer, and the
  router's GEMMs count in both of the first two; it says how much of the layer is routing
- ``hf_mixtral``: transformers' ``MixtralSparseMoeBlock`` (its default experts implementation)
- ``ds_grouped``: DeepSpeed's ``GroupedExperts`` (grouped_mm) with DeepSpeed's own AutoEP routing,
  permutation and combine at ep_size 1 (``TokenChoiceTopKRouter``, ``permute_by_local_expert``,
  ``combine_from_routed``)
- ``ds_classic``: classic ``deepspeed.moe.layer.MoE`` (capacity factor 1.25: it drops tokens, so it
  does less work than a dropless layer), top-1/top-2 only

Shapes: ``small`` = mixtral_small's layer H256 F512 E8 top-2; ``S1`` = H512 F1024 E8 top-2;
``S2`` = H512 F256 E64 top-8 (fine-grained). Reported: median ms, ratio of medians to dense, the
median of the per-round ratios to dense ("paired": each round's variant over the same round's dense,
steadier on a shared machine whose load drifts during the run), active GFLOP/s
(fwd+bwd = 18 * tokens * k * H * F) and that as % of a ``torch.mm`` measured in the same run.

    python benchmarks/bench_moe_layer.py --device cpu --threads 2 --tokens 4096
    python benchmarks/bench_moe_layer.py --quick     # small shape, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.config import HOST_ALLOCATORS, MoEConfig
from moetrain.model.layers import SwiGLU
from moetrain.moe import LocalExchange, MoELayer
from moetrain.trainer.host_memory import configure_host_allocator

SHAPES = {"small": (256, 512, 8, 2), "S1": (512, 1024, 8, 2), "S2": (512, 256, 64, 8)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NO_EXPERT_FLOPS = {"routing_only"}  # no GFLOP/s column: it runs none of the expert GEMMs


def _timer(device: torch.device):
    def run(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    return run


def mm_peak_gflops(device: torch.device, dtype: torch.dtype, n: int, timer, tries: int = 3) -> float:
    """Best of ``tries`` ``torch.mm`` n x n x n in this dtype: the GEMM ceiling of this machine."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timer(lambda: a @ b)
    return 2 * n**3 / min(timer(lambda: a @ b) for _ in range(tries)) / 1e6


def _init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.normal_(p, std=0.02)
    return module


def moetrain_layer(H, Fh, E, K, impl, row_block=None):
    layer = _init(MoELayer(H, Fh, E, K, MoEConfig(backend="torch", expert_impl=impl)))
    layer.experts.row_block = row_block
    return lambda x_NH: layer(x_NH.unsqueeze(0))[0].squeeze(0), layer


def experts_only(H, Fh, E, K, tokens):
    """Diagnostic floor: moetrain's grouped_mm experts alone, forward + backward, on the N*k copies
    already sorted by expert (random top-k loads): no router, no dispatch, no combine. It brings its
    own [N*k, H] input and output gradient (``fwd.own_io``)."""
    from moetrain.moe.experts import GroupedExperts

    experts = _init(GroupedExperts(E, H, Fh, "grouped_mm"))

    def fwd(x_SH):
        return experts(x_SH, fwd.counts)

    def resample() -> None:  # new loads, as a new routing would give
        counts = torch.bincount(torch.topk(torch.randn(tokens, E), K).indices.flatten(), minlength=E)
        fwd.counts = counts.to(fwd.counts.device) if hasattr(fwd, "counts") else counts

    resample()
    fwd.resample = resample
    fwd.own_io = (torch.randn(tokens * K, H), torch.randn(tokens * K, H))
    return fwd, experts


class _GemmsOnly(nn.Module):
    """The nine GEMMs of a SwiGLU FFN's forward + backward and nothing else, per expert, on fixed
    equal row counts (the best case for per-expert GEMMs: balanced, every kernel cached): for the
    MoE shape E experts x ceil(tokens * k / E) rows (rounded up to the row block), for the dense
    twin one [tokens, k * F] FFN. The ratio of the two is the floor, on this machine, of any MoE
    that runs its experts as per-expert GEMMs: routing, dispatch and elementwise work come on top."""

    def __init__(self, H: int, F: int, E: int, M: int) -> None:
        super().__init__()
        self.register_buffer("x", torch.randn(E, M, H))
        self.register_buffer("dy", torch.randn(E, M, H))
        self.register_buffer("a", torch.randn(E, M, F))  # stands for gate/up and their gradients
        self.register_buffer("w", torch.randn(E, F, H) * 0.02)  # stands for w1, v1 and w2

    def forward(self) -> None:
        for x, dy, a, w in zip(self.x, self.dy, self.a, self.w, strict=True):
            x @ w.T, x @ w.T, a @ w  # gate, up, down
            dy @ w.T, a.T @ dy  # d(h), d(w2)
            a @ w, a @ w, a.T @ x, a.T @ x  # d(x) from gate and up, d(w1), d(v1)


def gemms_only(H, Fh, E, K, tokens, dense: bool, device, dtype):
    from moetrain.moe.experts import default_row_block

    if dense:
        module = _GemmsOnly(H, K * Fh, 1, tokens)
    else:
        block = default_row_block(device, dtype)  # as GroupedExperts pads
        module = _GemmsOnly(H, Fh, E, -(-tokens * K // E // block) * block)

    def fwd(tiny):
        module()
        return tiny  # nothing to differentiate: the "backward" GEMMs ran above

    fwd.own_io = (torch.zeros(1), torch.zeros(1))
    return fwd, module


_GEMM_OPS = ("mm", "addmm", "bmm", "_grouped_mm")


class _GemmRecorder(TorchDispatchMode):
    """Records each GEMM call (op and arguments) that runs under it, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []
        self.gemms = {getattr(torch.ops.aten, op).default for op in _GEMM_OPS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.gemms:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def gemms_replay(layer_fwd, module: nn.Module, H: int, tokens: int):
    """The GEMM calls of one fwd + bwd of ``layer_fwd``, recorded on a new input at every
    ``resample`` (untimed) and replayed alone by ``fwd`` (timed). Brings its own trivial io."""

    def resample() -> None:
        p = next(module.parameters())
        x = torch.randn(tokens, H, device=p.device, dtype=p.dtype, requires_grad=True)
        recorder = _GemmRecorder()
        with recorder:
            layer_fwd(x).backward(torch.randn_like(x))
        fwd.calls = recorder.calls

    def fwd(tiny):
        for func, args, kwargs in fwd.calls:
            func(*args, **kwargs)
        return tiny

    fwd.resample = resample
    fwd.own_io = (torch.zeros(1), torch.zeros(1))
    return fwd, module


class _CopiesStraightThrough(LocalExchange):
    """The local exchange with the experts left out: the combine reads the gathered copies. A
    LocalExchange, so the dispatch plan pads the experts' row blocks exactly as the real layer's."""

    def __call__(self, x_SH, tokens_per_expert_E, experts):
        return x_SH


def routing_only(H, Fh, E, K):
    fwd, layer = moetrain_layer(H, Fh, E, K, "grouped_mm")
    layer.exchange = _CopiesStraightThrough()
    return fwd, layer


def derived_ratios(times: dict[str, list[float]]) -> dict[str, tuple[str, float]]:
    """The GEMM floor and the sum of parts of one shape, each the median over rounds of a ratio of
    that round's times: name -> (how it is computed, value)."""
    out = {}
    if "gemms_replay" in times and "gemms_replay_dense" in times:
        replay = [a / b for a, b in zip(times["gemms_replay"], times["gemms_replay_dense"])]
        out["floor_gemm"] = ("GEMM floor: gemms_replay / gemms_replay_dense", statistics.median(replay))
        if "routing_only" in times:
            rounds = zip(
                times["gemms_replay"], times["gemms_replay_dense"], times["routing_only"], times["dense"]
            )
            layer = [
                (moe + routing + dense - dense_gemms) / dense for moe, dense_gemms, routing, dense in rounds
            ]
            out["sum_of_parts"] = (
                "sum of parts: (gemms_replay + routing_only + dense - gemms_replay_dense) / dense",
                statistics.median(layer),
            )
    return out


def hf_mixtral(H, Fh, E, K):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=H,
        intermediate_size=Fh,
        num_local_experts=E,
        num_experts_per_tok=K,
        experts_implementation="grouped_mm",  # its CPU default when built as a whole model
    )
    block = _init(MixtralSparseMoeBlock(cfg))

    def fwd(x_NH):
        out = block(x_NH.unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out).squeeze(0)

    return fwd, block


def ds_grouped(H, Fh, E, K):
    """DeepSpeed 0.19's AutoEP path at ep_size 1, from its own pieces (AutoEPMoELayer._forward)."""
    from deepspeed.module_inject.auto_ep_layer import (
        RouterOutput,
        combine_from_routed,
        permute_by_local_expert,
        unpermute_by_local_expert,
    )
    from deepspeed.moe.ep_experts import GroupedExperts
    from deepspeed.moe.ep_router import TokenChoiceTopKRouter

    mod = nn.Module()
    mod.router = TokenChoiceTopKRouter(H, E, None, None, K, "softmax", True, 1.0, False)
    mod.experts = GroupedExperts(H, Fh, E, use_grouped_mm=True)
    _init(mod)

    def fwd(x_NH):
        ro = RouterOutput(*mod.router(x_NH, None))
        order = torch.argsort(ro.selected_experts.view(-1), stable=True)
        routed = x_NH[order // K]
        permuted, perm_idx, counts, n = permute_by_local_expert(routed, ro.num_tokens_per_expert)
        y = unpermute_by_local_expert(mod.experts(permuted, counts), perm_idx, n)
        shape = (1, x_NH.shape[0], H)
        return combine_from_routed(y, ro.top_scores, order, K, "post", "weighted_sum", shape).view(-1, H)

    return fwd, mod


def ds_classic(H, Fh, E, K):
    from deepspeed.moe.layer import MoE

    if K > 2:
        raise ValueError("classic deepspeed.moe MoE gates top-1 or top-2 only")
    layer = _init(MoE(H, SwiGLU(H, Fh), num_experts=E, ep_size=1, k=K, capacity_factor=1.25))
    return lambda x_NH: layer(x_NH.unsqueeze(0))[0].squeeze(0), layer


def _ensure_process_group() -> None:
    """deepspeed.moe needs torch.distributed (world 1, gloo) for its expert groups."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        dist.init_process_group("gloo", rank=0, world_size=1)


def _dense_fwd(H: int, F: int):
    dense = _init(SwiGLU(H, F))
    return dense, dense


def build_variants(H, Fh, E, K, tokens, device, dtype, names):
    builders = {
        "moetrain": lambda: moetrain_layer(H, Fh, E, K, "grouped_mm"),
        "moetrain_loop": lambda: moetrain_layer(H, Fh, E, K, "loop"),
        "moetrain_unpadded": lambda: moetrain_layer(H, Fh, E, K, "grouped_mm", row_block=1),
        "experts_only": lambda: experts_only(H, Fh, E, K, tokens),
        "gemms_only": lambda: gemms_only(H, Fh, E, K, tokens, False, device, dtype),
        "gemms_dense": lambda: gemms_only(H, Fh, E, K, tokens, True, device, dtype),
        "gemms_replay": lambda: gemms_replay(*moetrain_layer(H, Fh, E, K, "grouped_mm"), H, tokens),
        "gemms_replay_dense": lambda: gemms_replay(*_dense_fwd(H, K * Fh), H, tokens),
        "routing_only": lambda: routing_only(H, Fh, E, K),
        "hf_mixtral": lambda: hf_mixtral(H, Fh, E, K),
        "ds_grouped": lambda: ds_grouped(H, Fh, E, K),
        "ds_classic": lambda: ds_classic(H, Fh, E, K),
    }
    dense = _dense_fwd(H, K * Fh)[0].to(device, dtype)
    variants, skipped = {"dense": dense}, {}
    for name in names:
        if name not in builders:
            skipped[name] = f"unknown variant: one of {', '.join(builders)}"
            continue
        try:
            torch.manual_seed(0)
            fwd, module = builders[name]()
            module.to(device, dtype)
            if hasattr(fwd, "counts"):
                fwd.counts = fwd.counts.to(device)
            if hasattr(fwd, "own_io"):
                fwd.own_io = tuple(t.to(device, dtype) for t in fwd.own_io)
            fwd.module = module  # for --grads fresh
            getattr(fwd, "resample", lambda: None)()  # first loads / recording, now on device and dtype
            variants[name] = fwd
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return variants, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="small,S1,S2")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (small uses half)")
    ap.add_argument(
        "--bf16-tokens",
        type=int,
        default=None,
        help="tokens for bf16 (default: --tokens, or 512 where bf16 torch.mm runs at < 1/4 of fp32's; then the small shape only)",
    )
    ap.add_argument(
        "--variants",
        default="moetrain,experts_only,gemms_only,gemms_dense,gemms_replay,gemms_replay_dense,routing_only,moetrain_unpadded,moetrain_loop,hf_mixtral,ds_grouped,ds_classic",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--fixed-inputs",
        action="store_true",
        help="the same input every round (same routing, same expert row counts); default: new each round, as in training",
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU device only)")
    ap.add_argument("--peak-size", type=int, default=1024, help="n of the torch.mm peak measurement")
    ap.add_argument("--quick", action="store_true", help="small shape, fp32, 5 repeats")
    ap.add_argument("--json", default=None, help="write the rows here (for plot_bench.py)")
    ap.add_argument(
        "--grads",
        default="accumulate",
        choices=("accumulate", "fresh"),
        help="accumulate: every round adds into the parameters' .grad (as micro-batches 2..n of "
        "gradient accumulation do); fresh: .grad set to None before each round, untimed (as a step "
        "without accumulation: DeepSpeed's zero_grad sets them to None)",
    )
    ap.add_argument(
        "--host-allocator",
        default="retain",
        choices=HOST_ALLOCATORS,
        help="CPU malloc policy, as parallel.host_allocator in training (default: what training uses)",
    )
    args = ap.parse_args()
    args.bf16_shapes = None
    if args.quick:
        args.shapes, args.dtypes, args.repeats = "small", "fp32", 5
    device = torch.device(args.device)
    if device.type == "cpu":  # as the trainer does on CPU
        torch.set_num_threads(args.threads)
        configure_host_allocator(args.host_allocator)
    timer = _timer(device)
    names = [n for n in args.variants.split(",") if n and n != "dense"]  # dense always runs
    if "ds_classic" in names or "ds_grouped" in names:
        _ensure_process_group()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{args.threads}"
    print(
        f"device: {where}, torch {torch.__version__}, fwd+bwd, median of {args.repeats}, grads {args.grads}"
    )
    rows = []
    peaks = {d: mm_peak_gflops(device, DTYPES[d], args.peak_size, timer) for d in args.dtypes.split(",")}
    if args.bf16_tokens is None and peaks.get("bf16", 1e9) < peaks.get("fp32", 0.0) / 4:
        # A CPU without bf16 instructions (no AVX512-BF16/AMX) runs bf16 GEMMs on a slow generic
        # path: full-size bf16 steps would take minutes each. Fewer tokens keep the suite short.
        args.bf16_tokens = 512
        args.bf16_shapes = "small"
        print(
            f"note: bf16 torch.mm {peaks['bf16']:.1f} GFLOP/s vs fp32 {peaks['fp32']:.1f} (no bf16 "
            "instructions?): bf16 rows use the small shape at 256 tokens only"
        )
    for dt_name in args.dtypes.split(","):
        dtype = DTYPES[dt_name]
        peak = peaks[dt_name]
        print(
            f"\n{dt_name}: torch.mm {args.peak_size}^3 peak {peak:.1f} GFLOP/s; load {os.getloadavg()[0]:.2f}"
        )
        print("| shape | tokens | variant | ms | × dense | paired | GFLOP/s | % mm peak |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        shapes = args.bf16_shapes if dt_name == "bf16" and args.bf16_shapes else args.shapes
        for shape in shapes.split(","):
            H, Fh, E, K = SHAPES[shape]
            tokens = args.bf16_tokens if (dt_name == "bf16" and args.bf16_tokens) else args.tokens
            tokens = tokens // 2 if shape == "small" else tokens  # the shape: 2k tokens
            torch.manual_seed(0)
            variants, skipped = build_variants(H, Fh, E, K, tokens, device, dtype, names)
            x = torch.randn(tokens, H, device=device, dtype=dtype)
            grad = torch.randn_like(x)

            def step(fwd, x, grad):
                x_in, g_out = getattr(fwd, "own_io", (x, grad))
                fwd(x_in.detach().requires_grad_(True)).backward(g_out)

            times: dict[str, list[float]] = {k: [] for k in variants}
            for i in range(args.warmup + args.repeats):
                if not args.fixed_inputs:
                    # In training the routing, and so every expert's row count, changes every step.
                    # Kernels compiled per GEMM shape (oneDNN's bf16 on CPU) are then compiled again
                    # and again; a fixed input would hide that, as it would any cost of new shapes.
                    x, grad = torch.randn_like(x), torch.randn_like(grad)
                    for fwd in variants.values():
                        getattr(fwd, "resample", lambda: None)()
                for k, fwd in variants.items():  # interleaved
                    if args.grads == "fresh":
                        getattr(fwd, "module", fwd).zero_grad(set_to_none=True)
                    ms = timer(lambda fwd=fwd, x=x, grad=grad: step(fwd, x, grad))
                    if i >= args.warmup:
                        times[k].append(ms)
                # the peak too, between the steps: one taken at a single moment of a shared machine's
                # load can sit below what the variants reach (best of all rounds)
                peak = max(peak, mm_peak_gflops(device, dtype, args.peak_size, timer, tries=1))
                peaks[dt_name] = peak
            flops = 18 * tokens * K * H * Fh
            dense_ms = statistics.median(times["dense"])
            for k, v in times.items():
                ms = statistics.median(v)
                gf = None if k in NO_EXPERT_FLOPS else flops / ms / 1e6
                paired = statistics.median(a / b for a, b in zip(v, times["dense"]))
                row = dict(shape=shape, dtype=dt_name, tokens=tokens, variant=k, ms=ms,
                           ratio=ms / dense_ms, paired=paired, gflops=gf, peak_pct=None if gf is None else 100 * gf / peak,
                           peak_gflops=peak, load=os.getloadavg()[0])  # fmt: skip
                rows.append(row)
                rate = "| |" if gf is None else f"| {gf:.1f} | {row['peak_pct']:.0f}% |"
                print(
                    f"| {shape} H{H} F{Fh} E{E} k{K} | {tokens} | {k} | {ms:.1f} | {row['ratio']:.2f} | {paired:.2f} "
                    f"{rate}",
                    flush=True,
                )
            for name, (how, value) in derived_ratios(times).items():
                rows.append(
                    dict(shape=shape, dtype=dt_name, tokens=tokens, variant=name, ratio=value, paired=value)
                )
                print(f"| {shape} | {tokens} | {how}, median of per-round ratios | | | {value:.2f} | | |")
            for k, why in skipped.items():
                print(f"| {shape} | {tokens} | {k} | n/a: {why} | | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
