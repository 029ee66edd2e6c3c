"""The base model a LoRA checkpoint refers to, instead of holding it.

A LoRA run's checkpoint stores its trainable tensors only (the adapters, their optimizer state) and
``trainer_state.json["lora_base"]``: ``{"path", "sha256"}`` of the ``model.init_from`` folder (a
hash of its config and weight files), or ``{"random_init_seed"}`` for a base that the config and
seed rebuild exactly. Resuming and exporting check the reference first: a missing or changed base
is one line, never adapters silently applied to other weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from moetrain.checkpoint.model_file import CheckpointError

KEY = "lora_base"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def folder_hash(folder: Path) -> str:
    """sha256 over config.json and every weight file of a transformers folder (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES))
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def base_reference(init_from: str | None, seed: int) -> dict[str, Any]:
    if init_from is None:
        return {"random_init_seed": seed}
    return {"path": str(Path(init_from).resolve()), "sha256": folder_hash(Path(init_from))}


def check_base(ref: dict[str, Any] | None, checkpoint: Path) -> None:
    """One-line ``CheckpointError`` when the base ``ref`` names is gone or has other content."""
    if not ref or "path" not in ref:
        return
    base = Path(ref["path"])
    if not base.is_dir():
        raise CheckpointError(
            f"the LoRA checkpoint {checkpoint} needs its base model {base}, which is missing; "
            "fix: put the base model back at that path"
        )
    if folder_hash(base) != ref["sha256"]:
        raise CheckpointError(
            f"the base model {base} changed since the LoRA checkpoint {checkpoint} was written "
            f"(sha256 {ref['sha256'][:12]}... expected); fix: restore the original base model"
        )


def base_state(ref: dict[str, Any], model_cfg: Any) -> dict[str, Any]:
    """The base weights (our names, all experts, fp32) that ``ref`` names: the ``model.init_from``
    folder's, or the random init that ``trainer.seed`` gives (as the trainer built it)."""
    import dataclasses

    import torch

    from moetrain.config import LoRAConfig
    from moetrain.model import MoETransformer

    torch.manual_seed(ref.get("random_init_seed", 0))  # the trainer's seed_everything before build_model
    model = MoETransformer(dataclasses.replace(model_cfg, lora=LoRAConfig()))
    if "path" in ref:
        from moetrain.pretrained import load_pretrained

        load_pretrained(model, ref["path"])
    return model.state_dict()


def merged_lora_state(folder: Path, model_cfg: Any, adapters: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A LoRA checkpoint's adapters merged into its (checked) base, and the config without LoRA."""
    import dataclasses

    from moetrain.checkpoint.manager import read_trainer_state
    from moetrain.config import LoRAConfig
    from moetrain.model.lora import merge_lora

    ref = read_trainer_state(folder).get(KEY)
    if not ref:
        raise CheckpointError(f"{folder} is a LoRA checkpoint without a base reference ({KEY})")
    check_base(ref, folder)
    merged = merge_lora({**base_state(ref, model_cfg), **adapters}, model_cfg.lora)
    return merged, dataclasses.replace(model_cfg, lora=LoRAConfig())
