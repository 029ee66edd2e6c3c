"""Checkpoints: the whole training state once, in backend- and layout-independent files.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` holding
- ``model.safetensors``: every parameter of the model (the optimizer's fp32 masters) with *all*
  experts in global order, under the names of ``MoETransformer.state_dict()`` (what export, generate,
  analyze and resuming read);
- ``optimizer.safetensors``: the optimizer state per parameter, experts in the same order;
- ``config.yaml``: the resolved training config; ``tokenizer/``: the tokenizer the model was trained with;
- ``trainer_state.json`` and ``rank_state/``: step, tokens seen, data-loader position, RNG states;
- ``manifest.json``: sizes and SHA-256 of every file, written last.
No DeepSpeed engine files (they would be a second, per-rank copy). ``checkpoints/latest`` names the newest complete checkpoint; it is written last, atomically.
"""

from moetrain.checkpoint.model_file import (
    LoadedModel,
    load_model,
    read_model_config,
    resolve_checkpoint,
    save_model_file,
)

__all__ = ["LoadedModel", "load_model", "read_model_config", "resolve_checkpoint", "save_model_file"]
