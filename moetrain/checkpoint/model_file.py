"""The consolidated model file of a checkpoint, and loading a model from a checkpoint folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from moetrain.config import ModelConfig, model_config_from_dict

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
LATEST = "latest"


class CheckpointError(ValueError):
    pass


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint folder, a ``checkpoints/`` folder or a run folder; return the checkpoint folder."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / MODEL_FILE).is_file():
            return candidate
        latest = candidate / LATEST
        if latest.is_file():
            target = candidate / latest.read_text().strip()
            if (target / MODEL_FILE).is_file():
                return target
    raise CheckpointError(
        f"no checkpoint at {p}: expected {MODEL_FILE} in it, or a checkpoints/latest pointer"
    )


def save_model_file(state_dict: dict[str, torch.Tensor], folder: Path, config: dict[str, Any]) -> None:
    """Write model.safetensors + config.yaml into ``folder`` (the caller makes the folder atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    unique: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for k, v in state_dict.items():  # safetensors refuses shared storage: drop tied duplicates
        if v.data_ptr() in seen and k == "lm_head.weight":
            continue
        seen[v.data_ptr()] = k
        unique[k] = v.detach().to("cpu").contiguous()
    save_file(unique, str(folder / MODEL_FILE), metadata={"format": "pt", "producer": "moetrain"})
    with open(folder / CONFIG_FILE, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


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

    folder = resolve_checkpoint(path)
    config = read_config(folder)
    model_cfg = model_config_from_dict(config["model"])
    state = load_file(str(folder / MODEL_FILE), device=device)
    if model_cfg.lora.rank:  # adapters only: merged into the base the checkpoint refers to
        from moetrain.checkpoint.base_ref import merged_lora_state

        state, model_cfg = merged_lora_state(folder, model_cfg, state)
    model = MoETransformer(model_cfg)
    if model_cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state["embed.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / MODEL_FILE} does not match the config: missing {missing}, unexpected {unexpected}"
        )
    model.to(device).eval()
    tokenizer = None
    if load_tokenizer and (folder / TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    return LoadedModel(model, config, folder, tokenizer)
