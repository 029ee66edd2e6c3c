"""The expert all-to-all in chunks, overlapped with the experts' GEMMs (``parallel.a2a_chunks`` > 1).

Each (destination rank, expert) group of routed token copies is cut into C nearly equal slices, so
chunk i holds rows ``[c * i // C, c * (i + 1) // C)`` of every group of c copies; the receiver cuts
its counts the same way, so one count exchange (as in ``AllToAllExchange``) gives every chunk's
splits. Forward: chunk i+1's dispatch is in flight (``async_op=True``) while chunk i's experts run,
and chunk i's combine is issued as soon as its experts are done. Backward mirrors it: each exchange's
backward issues the reverse exchange asynchronously and only the consumer of its result waits.

Every rank must issue its collectives in the same order. Forward order is the program's; backward
order would be the autograd engine's choice among ready nodes, so the waits are chained by a scalar
"order token" that each ``_Wait`` takes from the previous one: backward then visits the waits (which
issue the reverse exchanges) strictly in reverse forward order on every rank.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class _Link:
    """What a ``_Start`` and its ``_Wait`` share: the forward work, the reverse work, and the tensors
    the in-flight operations read or write (kept alive until they finish)."""

    __slots__ = ("fwd", "fwd_src", "bwd", "bwd_src", "bwd_out")

    def __init__(self) -> None:
        self.fwd = self.fwd_src = self.bwd = self.bwd_src = self.bwd_out = None


def _all_to_all(out: torch.Tensor, src: torch.Tensor, out_splits, in_splits, group) -> Any:
    return dist.all_to_all_single(out, src, out_splits, in_splits, group=group, async_op=True)


class _Start(torch.autograd.Function):
    """Issue ``x``'s all-to-all and return the (still filling) receive buffer; backward waits for the
    reverse exchange the matching ``_Wait`` issued and returns its result."""

    @staticmethod
    def forward(ctx, x, link: _Link, out_splits: list[int], in_splits: list[int], group: Any):
        out = x.new_empty(sum(out_splits), x.shape[1])
        link.fwd_src = x.contiguous()
        link.fwd = _all_to_all(out, link.fwd_src, out_splits, in_splits, group)
        ctx.link = link
        return out

    @staticmethod
    def backward(ctx, grad_out):
        link = ctx.link
        link.bwd.wait()
        grad_x = link.bwd_out
        link.bwd = link.bwd_src = link.bwd_out = None
        return grad_x, None, None, None, None


class _Wait(torch.autograd.Function):
    """Wait for ``_Start``'s exchange; backward issues the reverse exchange of the gradient (async)."""

    @staticmethod
    def forward(ctx, received, token, link: _Link, out_splits: list[int], in_splits: list[int], group):
        link.fwd.wait()
        link.fwd = link.fwd_src = None
        ctx.link, ctx.splits, ctx.group = link, (out_splits, in_splits), group
        return received.view_as(received), token.clone()

    @staticmethod
    def backward(ctx, grad, grad_token):
        if not ctx.needs_input_grad[0]:  # nothing upstream wants it (frozen inputs): no exchange to wait on
            return None, grad_token, None, None, None, None
        out_splits, in_splits = ctx.splits
        link = ctx.link
        link.bwd_src = grad.contiguous()
        link.bwd_out = grad.new_empty(sum(in_splits), grad.shape[1])
        link.bwd = _all_to_all(link.bwd_out, link.bwd_src, in_splits, out_splits, ctx.group)
        # the gradient itself went out with the reverse exchange: _Start's backward returns its result
        return grad, grad_token, None, None, None, None


def chunk_counts(counts_G: torch.Tensor, chunks: int) -> torch.Tensor:
    """[chunks, G] copies of each group in each chunk: chunk i gets ``c*(i+1)//C - c*i//C`` of c."""
    edges = counts_G.view(1, -1) * torch.arange(chunks + 1).view(-1, 1) // chunks
    return edges.diff(dim=0)


def chunk_of_rows(counts_G: torch.Tensor, chunks: int, device: torch.device) -> torch.Tensor:
    """The chunk of each row of copies sorted by group (row p of a group of c: ``(C(p+1)-1) // c``)."""
    counts = counts_G.to(device)
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    pos = torch.arange(group.numel(), device=device) - first[group]
    return (chunks * (pos + 1) - 1) // counts[group]


class ChunkedAllToAllExchange:
    """``AllToAllExchange`` in ``chunks`` pieces, each piece's exchange overlapped with the previous
    piece's experts. The same copies meet the same experts: only GEMM row counts differ (rounding)."""

    def __init__(self, group: Any, ep_size: int, num_local_experts: int, chunks: int) -> None:
        self.group, self.ep_size, self.num_local_experts, self.chunks = (
            group,
            ep_size,
            num_local_experts,
            chunks,
        )

    def __call__(
        self, x_SH: torch.Tensor, tokens_per_expert_E: torch.Tensor, experts: nn.Module
    ) -> torch.Tensor:
        ep, El, C = self.ep_size, self.num_local_experts, self.chunks
        counts_send = tokens_per_expert_E.to(torch.int64)
        counts_recv = torch.empty_like(counts_send)  # [src rank, local expert] after the exchange
        dist.all_to_all_single(counts_recv, counts_send, group=self.group)
        send_CG, recv_CG = chunk_counts(counts_send.cpu(), C), chunk_counts(counts_recv.cpu(), C)
        send_splits = send_CG.view(C, ep, El).sum(2).tolist()  # per chunk, per destination rank
        recv_splits = recv_CG.view(C, ep, El).sum(2).tolist()
        # copies regrouped chunk by chunk (each chunk still sorted by destination rank, then expert)
        order = torch.argsort(chunk_of_rows(counts_send.cpu(), C, x_SH.device), stable=True)
        x_chunks = x_SH[order].split(send_CG.sum(1).tolist())
        token = torch.zeros((), requires_grad=torch.is_grad_enabled())
        links = [(_Link(), _Link()) for _ in range(C)]

        def dispatch(i: int) -> torch.Tensor:
            return _Start.apply(x_chunks[i], links[i][0], recv_splits[i], send_splits[i], self.group)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # as AllToAllExchange
            in_flight, sent_back = dispatch(0), []
            for i in range(C):
                nxt = dispatch(i + 1) if i + 1 < C else None
                x_recv, token = _Wait.apply(
                    in_flight, token, links[i][0], recv_splits[i], send_splits[i], self.group
                )
                y_recv = _run_local_experts(x_recv, recv_CG[i], ep, El, experts)
                sent_back.append(
                    _Start.apply(y_recv, links[i][1], send_splits[i], recv_splits[i], self.group)
                )
                in_flight = nxt
            y_chunks = []
            for i in range(C):
                y, token = _Wait.apply(
                    sent_back[i], token, links[i][1], send_splits[i], recv_splits[i], self.group
                )
                y_chunks.append(y)
        y_chunked = torch.cat(y_chunks)
        return torch.empty_like(y_chunked).index_copy(0, order, y_chunked)


def _run_local_experts(
    x_recv: torch.Tensor, counts_G: torch.Tensor, ep: int, El: int, experts: nn.Module
) -> torch.Tensor:
    """Rows arrive grouped by source rank, then by local expert: regroup by local expert, run the
    experts, restore the arrival order (as ``AllToAllExchange`` does for the whole exchange)."""
    counts = counts_G.to(x_recv.device)
    expert_of_row = torch.repeat_interleave(torch.arange(El, device=x_recv.device).repeat(ep), counts)
    order = torch.argsort(expert_of_row, stable=True)
    y_sorted = experts(x_recv[order], counts.view(ep, El).sum(0))
    return torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
