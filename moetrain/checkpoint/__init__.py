"""Checkpoints: a backend- and layout-independent model file plus the engine/trainer state.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` holding
- ``model.safetensors``: every parameter of the model with *all* experts in global order, under the
  names of ``MoETransformer.state_dict()`` (what export, generate, analyze and EP resharding read);
- ``config.yaml``: the resolved training config; ``tokenizer/``: the tokenizer the model was trained with;
- ``trainer_state.json`` and ``rng/``: step, tokens seen, data-loader position, RNG states;
- the DeepSpeed engine state (optimizer, scheduler) in the engine's own sub-folder.
``checkpoints/latest`` names the newest complete checkpoint; it is written last, atomically.
"""

from moetrain.checkpoint.model_file import (
    LoadedModel,
    load_model,
    read_model_config,
    resolve_checkpoint,
    save_model_file,
)

__all__ = ["LoadedModel", "load_model", "read_model_config", "resolve_checkpoint", "save_model_file"]
