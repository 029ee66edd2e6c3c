"""Resuming from a sharded checkpoint: each rank reads only the pieces it holds, at any layout.

Every rank works out the pieces it holds now (checkpoint/layout.py: its experts by global index,
every non-expert tensor) and reads those byte ranges from the shards the index names. Verifying
against the manifest is shared out: file ``i`` of the manifest is hashed by rank ``i % world``
while it reads it (one sequential pass that also yields that rank's tensors), so each file is read
for hashing at most once across all ranks, and the ranks agree on the first problem found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moetrain.checkpoint import layout
from moetrain.checkpoint.integrity import MANIFEST, file_digest
from moetrain.checkpoint.model_file import CheckpointError
from moetrain.checkpoint.shards import read_index, read_tensors
from moetrain.distributed import all_gather_object

MODEL_INDEX = "model.safetensors.index.json"
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"


def is_sharded(folder: Path) -> bool:
    return (folder / MODEL_INDEX).is_file()


def _read_pieces(
    folder: Path, wanted: set[str], *, rank: int, world: int, verify: bool
) -> tuple[dict[str, torch.Tensor], str | None]:
    weight_map = read_index(folder / MODEL_INDEX)
    if (folder / OPTIMIZER_INDEX).is_file():
        weight_map.update(read_index(folder / OPTIMIZER_INDEX))
    by_file: dict[str, set[str]] = {}
    for name in wanted:
        if name in weight_map:
            by_file.setdefault(weight_map[name], set()).add(name)
    manifest = json.loads((folder / MANIFEST).read_text())["files"] if verify else {}
    mine_to_hash = {f for i, f in enumerate(sorted(manifest)) if i % world == rank}
    out: dict[str, torch.Tensor] = {}
    for rel in sorted(set(by_file) | mine_to_hash):
        path = folder / rel
        if not path.is_file():
            return out, f"{path}: missing"
        digest = manifest[rel]["sha256"] if rel in mine_to_hash else None
        if rel.endswith(".safetensors"):
            got, problem = read_tensors(path, by_file.get(rel, set()), sha256=digest)
            out.update(got)
        else:
            problem = (
                None
                if file_digest(path) == digest
                else f"{path}: contents differ from the manifest's SHA-256 (corrupted)"
            )
        if problem:
            return out, problem
    return out, None


def load_sharded(
    folder: Path, model: nn.Module, view: Any, *, rank: int, world: int, ep_size: int, verify: bool
) -> str | None:
    """Fill the module, the fp32 master weights and the optimizer state from ``folder``; returns
    None, or one line naming the damaged file (the same on every rank). Collective."""
    from moetrain.model.transformer import tied_aliases

    all_pieces = layout.pieces(model, world, ep_size)
    here = layout.held_here(all_pieces, rank, model)
    opt_names = read_index(folder / OPTIMIZER_INDEX) if (folder / OPTIMIZER_INDEX).is_file() else {}
    keys = sorted({k.split("/", 1)[0] for k in opt_names} - {"step"})
    wanted = set()
    for ps in here.values():
        for p in ps:
            wanted.add(p.name)
            wanted.update(f"{k}/{p.name}" for k in (*keys, "step"))
    flat, problem = _read_pieces(folder, wanted, rank=rank, world=world, verify=verify)
    problem = next((p for p in all_gather_object(problem) if p), None)
    if problem:
        return problem
    missing = sorted(p.name for ps in here.values() for p in ps if p.name not in flat)
    if missing:
        return f"{folder / MODEL_INDEX}: no tensor {missing[0]} (a checkpoint of another model?)"

    def whole(prefix: str, name: str) -> torch.Tensor:
        ps = here[name]
        if ps[0].local is None:
            return flat.pop(prefix + ps[0].name)
        return torch.stack([flat.pop(prefix + p.name) for p in ps])

    tensors = layout.stored_tensors(model)
    state = {name: whole("", name) for name, _, _ in tensors}
    if getattr(view, "kind", None) == "zero3":  # partitioned parameters: buffers here, set_master below
        model.load_state_dict({n: state[n] for n, _, is_param in tensors if not is_param}, strict=False)
    else:
        for alias, source in tied_aliases(model).items():  # a tie is stored once, under its source
            state.setdefault(alias, state[source])
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # LoRA: the base
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - frozen:
            raise CheckpointError(
                f"{folder} does not match the model: missing {missing}, unexpected {unexpected}"
            )
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    params = [(name, t) for name, t, is_param in tensors if is_param]
    for name, p in params:  # bf16 / ZeRO: the fp32 masters take the file's values, not rounded copies
        view.set_master(p, state[name])
    del state
    if keys:
        first = here[params[0][0]][0].name
        view.prepare_state(keys, float(flat[f"step/{first}"]))
        for name, p in params:
            for key in keys:
                view.set_state(p, key, whole(f"{key}/", name))
    return None
