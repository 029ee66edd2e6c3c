"""Reading checkpoints written before the sharded format (2026-12-05): one ``model.safetensors`` and
one ``optimizer.safetensors`` with all experts stacked in global order (or ``optimizer_full.pt``,
and DeepSpeed ``engine/`` files before that). Each rank keeps only its own experts
(``safe_open(...).get_slice``). Pickles go through checkpoint/safe_load.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.checkpoint.layout import expert_param_names
from moetrain.checkpoint.optimizer_state import FILE, OptimizerView
from moetrain.checkpoint.safe_load import safe_torch_load

LEGACY_FILE = "optimizer_full.pt"  # torch.save'd dict of the same content (ZeRO-0 checkpoints, 2026-11)


def read_layout_free(path: Path, model: nn.Module, ep: Any) -> dict[str, torch.Tensor]:
    """Read a layout-free safetensors file (model or optimizer state), keeping only this rank's
    experts (``safe_open(...).get_slice``): host memory follows the shard, never the whole model.
    A key names its parameter after the last ``/`` (``exp_avg/layers.0.ffn.experts.w1``)."""
    from safetensors import safe_open

    expert_names = expert_param_names(model) if ep.enabled else set()
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            sl = f.get_slice(key)
            if key.rsplit("/", 1)[-1] in expert_names and sl.get_shape():  # (step/<name> is a scalar)
                El = sl.get_shape()[0] // ep.ep_size
                out[key] = sl[ep.ep_rank * El : (ep.ep_rank + 1) * El]
            else:
                out[key] = f.get_tensor(key)
    return out


def load_model_file_shard(model: nn.Module, path: Path, ep: Any) -> dict[str, torch.Tensor]:
    """Load a layout-free ``model.safetensors`` (this rank's experts only); returns what was read
    (full precision: a bf16 module gets rounded copies, the optimizer's fp32 masters take the file's)."""
    from moetrain.checkpoint.model_file import CheckpointError
    from moetrain.model.transformer import drop_aliases, tied_aliases, untied_in_state

    sd = read_layout_free(path, model, ep)
    tied = tied_aliases(model)
    broken = untied_in_state(sd, tied)
    if broken:
        raise CheckpointError(
            f"{path}: {broken[0]} differs from {tied[broken[0]]} though the model ties them (a checkpoint "
            "written while the tie was lost): export it (exported untied) or train on with model.tie_embeddings=false"
        )
    sd = drop_aliases(sd, tied)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # LoRA: the base
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if set(missing) - set(tied) - frozen or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing}, unexpected {unexpected}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return sd


def read_legacy_state(folder: Path, *, trust: bool = False) -> dict[str, torch.Tensor] | None:
    """Checkpoints written before optimizer.safetensors: the same content in a torch.save'd dict
    (read through the restricted unpickler, see checkpoint/safe_load.py)."""

    path = folder / LEGACY_FILE
    if not path.is_file():
        return None
    out: dict[str, torch.Tensor] = {}
    for name, entry in safe_torch_load(path, trust=trust).items():
        out[f"step/{name}"] = torch.tensor(entry["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}/{name}"] = entry[key]
    return out


def load_training_state(
    model: nn.Module, view: OptimizerView, folder: Path, ep: Any, *, trust: bool = False
) -> bool:
    """Fill the module, the fp32 master weights and the optimizer state from a checkpoint's
    layout-free files, this rank's experts only. Returns False when the checkpoint holds no
    optimizer state (the optimizer then starts fresh; the caller decides whether that is an error)."""
    if view.kind == "zero3":  # partitioned parameters: the module takes its buffers, set_master the rest
        from moetrain.checkpoint import zero3_state

        weights = zero3_state.load_module_buffers(model, folder / "model.safetensors", ep)
    else:
        weights = load_model_file_shard(model, folder / "model.safetensors", ep)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # LoRA: not the base
    for name, p in params:  # bf16 / ZeRO: the fp32 masters take the file's values, not rounded copies
        view.set_master(p, weights[name])
    del weights
    path = folder / FILE
    if path.is_file():
        state = read_layout_free(path, model, ep)
    else:
        state = read_legacy_state(folder, trust=trust)
        if state is None:
            return False
        if ep.enabled:
            state = _legacy_shard(state, model, ep)
    keys = sorted({k.split("/", 1)[0] for k in state} - {"step"})
    view.prepare_state(keys, float(state[f"step/{params[0][0]}"]))
    for name, p in params:
        for key in keys:
            view.set_state(p, key, state[f"{key}/{name}"])
    return True


def _legacy_shard(state: dict[str, torch.Tensor], model: nn.Module, ep: Any) -> dict[str, torch.Tensor]:
    experts = expert_param_names(model)
    out = {}
    for k, t in state.items():
        if k.split("/", 1)[1] in experts and t.dim() > 0:
            El = t.shape[0] // ep.ep_size
            t = t[ep.ep_rank * El : (ep.ep_rank + 1) * El]
        out[k] = t
    return out


# ---- engine state for sharded runs ----------------------------------------------------------------
def load_engine_state(engine: Any, folder: Path, rank: int, *, trust: bool = False) -> None:
    """Checkpoints written before 2026-11-25 by ZeRO-1/2 or bf16 runs: per-rank engine files
    (pickles: restricted unpickler unless the user trusts the checkpoint, see checkpoint/safe_load.py)."""

    # map_location: each rank's file holds tensors of that rank's GPU; load everything to the host
    # first (DeepSpeed and load_state_dict copy onto this rank's device).
    state = safe_torch_load(folder / f"rank_{rank:05d}.pt", trust=trust)
    engine.module.load_state_dict(state["module"], strict=True)
    opt = engine.optimizer
    if type(opt).__module__.startswith("deepspeed.runtime.zero"):
        # ZeRO-1/2 index the list by data-parallel rank (and may merge partitions): give it every rank's.
        world = dist.get_world_size() if dist.is_initialized() else 1
        all_states = [
            state["optimizer"]
            if r == rank
            else safe_torch_load(folder / f"rank_{r:05d}.pt", trust=trust)["optimizer"]
            for r in range(world)
        ]
        opt.load_state_dict(all_states, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        opt.load_state_dict(state["optimizer"])
    if state["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
