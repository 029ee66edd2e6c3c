"""The consolidated model file of a checkpoint, and loading a model from a checkpoint folder."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from moetrain.config import ModelConfig, model_config_from_dict

MODEL_FILE = "model.safetensors"  # single-file checkpoints (before 2026-12-05)
MODEL_INDEX = "model.safetensors.index.json"  # sharded: model-0000k-of-0000N.safetensors
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
LATEST = "latest"


class CheckpointError(ValueError):
    pass


def has_model(folder: Path) -> bool:
    return (folder / MODEL_INDEX).is_file() or (folder / MODEL_FILE).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint folder, a ``checkpoints/`` folder or a run folder; return the checkpoint folder."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if has_model(candidate):
            return candidate
        latest = candidate / LATEST
        if latest.is_file():
            target = candidate / latest.read_text().strip()
            if has_model(target):
                return target
    raise CheckpointError(
        f"no checkpoint at {p}: expected {MODEL_FILE} in it, or a checkpoints/latest pointer"
    )


def save_model_file(state_dict: dict[str, torch.Tensor], folder: Path, config: dict[str, Any]) -> None:
    """Write model.safetensors + config.yaml into ``folder`` (the caller makes the folder atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    unique: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for k, v in state_dict.items():  # a tied parameter is one tensor: stored once, under its first name
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        unique[k] = v.detach().to("cpu").contiguous()
    save_file(unique, str(folder / MODEL_FILE), metadata={"format": "pt", "producer": "moetrain"})
    with open(folder / CONFIG_FILE, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


def _read_sharded(folder: Path, index: str) -> dict[str, torch.Tensor]:
    from moetrain.checkpoint.layout import consolidate
    from moetrain.checkpoint.shards import read_index, read_tensors

    flat: dict[str, torch.Tensor] = {}
    for shard in sorted(set(read_index(folder / index).values())):
        flat.update(read_tensors(folder / shard, None)[0])
    return consolidate(flat)


def read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights under the model's names, experts stacked in global order (either format)."""
    if (folder / MODEL_INDEX).is_file():
        return _read_sharded(folder, MODEL_INDEX)
    return load_file(str(folder / MODEL_FILE))


def read_optimizer_state(folder: Path) -> dict[str, torch.Tensor]:
    """``<key>/<parameter name>`` optimizer tensors, experts stacked in global order (either format)."""
    if (folder / OPTIMIZER_INDEX).is_file():
        return _read_sharded(folder, OPTIMIZER_INDEX)
    return load_file(str(folder / "optimizer.safetensors"))


def read_config(folder: Path) -> dict[str, Any]:
    with open(folder / CONFIG_FILE) as f:
        return yaml.safe_load(f)


def read_model_config(folder: Path) -> ModelConfig:
    return model_config_from_dict(read_config(folder)["model"])


@dataclass
class LoadedModel:
    model: Any  # MoETransformer
    config: dict[str, Any]
    folder: Path
    tokenizer: Any | None


def load_model(path: str | os.PathLike, *, device: str = "cpu", load_tokenizer: bool = True) -> LoadedModel:
    """Build a single-process MoETransformer (all experts local) from any checkpoint."""
    from moetrain.model import MoETransformer
    from moetrain.model.transformer import declared_ties, drop_aliases, tied_aliases, untied_in_state

    folder = resolve_checkpoint(path)
    config = read_config(folder)
    model_cfg = model_config_from_dict(config["model"])
    state = read_model_state(folder)
    if model_cfg.lora.rank:  # adapters only: merged into the base the checkpoint refers to
        from moetrain.checkpoint.base_ref import merged_lora_state

        state, model_cfg = merged_lora_state(folder, model_cfg, state)
    if untied_in_state(state, declared_ties(model_cfg)):
        # Written while the tie was lost (moetrain before 2026-12-05): the model trained an own head.
        warnings.warn(
            f"{folder}: lm_head.weight differs from embed.weight though model.tie_embeddings=true "
            "(written while the tie was lost); loaded untied, as it was trained",
            UserWarning,
            stacklevel=2,
        )
        model_cfg = dataclasses.replace(model_cfg, tie_embeddings=False)
        config["model"]["tie_embeddings"] = False
    model = MoETransformer(model_cfg)
    tied = tied_aliases(model)
    missing, unexpected = model.load_state_dict(drop_aliases(state, tied), strict=False)
    if set(missing) - set(tied) or unexpected:
        raise CheckpointError(
            f"{folder} weights do not match the config: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    model.to(device).eval()
    tokenizer = None
    if load_tokenizer and (folder / TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR), trust_remote_code=False)
    return LoadedModel(model, config, folder, tokenizer)
