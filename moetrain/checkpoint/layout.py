"""What a checkpoint stores, under which global names, and which rank writes each piece.

A checkpoint is layout-free: every tensor is stored under a global name that does not depend on
``ep_size``, world size or ZeRO stage. Non-expert parameters and buffers keep their
``named_parameters()`` / ``state_dict()`` names (a tied matrix is one parameter, stored once); the
stacked expert weights ``layers.L.ffn.experts.w1`` ([E_local, ...] on a rank) are stored one expert
at a time under the *global* expert index, ``layers.L.ffn.experts.<g>.w1``. Any layout then reads
exactly the pieces it holds.

Writers: each piece has a set of holders (every rank for non-expert tensors; for expert ``g`` the
ranks of its expert-data-parallel group). Pieces are handed out largest first to the holder with
the fewest bytes so far, so each expert is written once (by one rank of its group) and the
non-expert tensors fill up the ranks with fewer experts: no rank writes everything, no gather.
Every rank computes the same plan from the same model shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from moetrain.moe import MoELayer

EXPERT_PARAM_NAMES = ("w1", "v1", "w2")


def expert_param_names(model: nn.Module) -> set[str]:
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            out |= {f"{name}.experts.{p}" for p, _ in module.experts.named_parameters()}  # + LoRA adapters
    return out


def expert_piece_name(param: str, g: int) -> str:
    """``layers.0.ffn.experts.w1`` + 3 -> ``layers.0.ffn.experts.3.w1``."""
    prefix, w = param.rsplit(".", 1)
    return f"{prefix}.{g}.{w}"


@dataclass(frozen=True)
class Piece:
    name: str  # stored (global) name
    param: str  # the model's name for the tensor it comes from
    local: int | None  # index into the stacked expert tensor on a holder; None: the whole tensor
    nbytes: int  # fp32 bytes of the piece
    holders: tuple[int, ...]
    is_param: bool


def _first_expert(model: nn.Module, param: str) -> int:
    module = model.get_submodule(param.rsplit(".", 1)[0])
    return int(getattr(module, "first_expert", 0))


def stored_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor, is_param)``: every parameter once (``named_parameters``: a tie is one
    parameter) and every persistent buffer (e.g. the routers' expert-selection bias)."""
    from moetrain.model.transformer import tied_aliases

    state = model.state_dict(keep_vars=True)
    for alias, source in tied_aliases(model).items():  # never save a silently untied head
        if alias in state and state[alias] is not state[source]:
            raise RuntimeError(
                f"{alias} is no longer {source}: the tie was lost (call model.tie_weights() after "
                "replacing parameters)"
            )
    # A frozen parameter (a LoRA run's base) is not training state: the run rebuilds it from its source.
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = [(n, t) for n, t in state.items() if n not in names]
    return [(n, p, True) for n, p in params] + [(n, b, False) for n, b in buffers]


def pieces(model: nn.Module, world_size: int, ep_size: int) -> list[Piece]:
    """Every stored piece with its holders, the same list on every rank."""
    experts = expert_param_names(model)
    everyone = tuple(range(world_size))
    out = []
    for name, t, is_param in stored_tensors(model):
        shape = getattr(t, "ds_shape", t.shape)  # ZeRO-3: data is empty outside the forward
        per = math.prod(shape) * 4
        if name not in experts:
            out.append(Piece(name, name, None, per, everyone, is_param))
            continue
        el = shape[0]
        per //= max(el, 1)
        for g in range(el * ep_size):
            holders = tuple(r for r in everyone if r % ep_size == g // el)
            out.append(Piece(expert_piece_name(name, g), name, g % el, per, holders, is_param))
    return out


def writers(all_pieces: list[Piece], world_size: int) -> dict[str, int]:
    """Stored name -> the rank that writes it (largest pieces first, to the least loaded holder)."""
    load = [0] * world_size
    out: dict[str, int] = {}
    for p in sorted(all_pieces, key=lambda p: (-p.nbytes, p.name)):
        r = min(p.holders, key=lambda r: (load[r], r))
        load[r] += p.nbytes
        out[p.name] = r
    return out


def held_here(all_pieces: list[Piece], rank: int, model: nn.Module) -> dict[str, list[Piece]]:
    """Model name -> the pieces this rank holds (its experts, in local order)."""
    out: dict[str, list[Piece]] = {}
    for p in all_pieces:
        if rank in p.holders:
            out.setdefault(p.param, []).append(p)
    for name, ps in out.items():
        if ps[0].local is not None:
            first = _first_expert(model, name)
            assert [int(p.name.rsplit(".", 2)[1]) for p in ps] == list(range(first, first + len(ps))), name
    return out


def piece_of(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    return t if piece.local is None else t[piece.local]


_EXPERT_PIECE = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)$")


def consolidate(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored names -> the model's names with experts stacked in global order (what export,
    generate, analyze and older readers expect); ``step/...`` counters stay scalars."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in flat.items():
        m = _EXPERT_PIECE.match(key)
        if m is None:
            out[key] = t
        else:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = t
    for key, parts in groups.items():
        ordered = [parts[g] for g in range(len(parts))]
        out[key] = ordered[0] if key.startswith("step/") else torch.stack(ordered)
    return out
