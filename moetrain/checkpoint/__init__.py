"""Checkpoints: the whole training state once, layout-free, every rank writing and reading its share.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` holding
- ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json`` (transformers' sharded
  layout): every parameter (the optimizer's fp32 masters) and persistent buffer, experts stored one
  by one under their global index (``layers.0.ffn.experts.5.w1``), shard ``k`` written by rank ``k``
  (checkpoint/layout.py says which rank writes what);
- ``optimizer-0000k-of-0000N.safetensors`` + ``optimizer.safetensors.index.json``: AdamW state per
  piece (``exp_avg/<name>``, ``exp_avg_sq/<name>``, ``step/<name>``);
- ``config.yaml``; ``tokenizer/``; ``trainer_state.json``; ``rank_state/rank_NNNNN.json`` (loader
  position, RNG states): no pickle anywhere (checkpoint/safe_load.py reads older ones);
- ``manifest.json``: sizes and SHA-256 of every file, from the digests the ranks computed while
  writing, written last.
``checkpoints/latest`` names the newest complete checkpoint; it is written last, atomically.
``Checkpointer`` (checkpointer.py) saves, ``resume.py`` chooses and restores; single-file checkpoints
(``model.safetensors`` / ``optimizer.safetensors``, before 2026-12-05) still load (legacy_format.py).
"""

from moetrain.checkpoint.model_file import (
    LoadedModel,
    load_model,
    read_model_config,
    read_model_state,
    read_optimizer_state,
    resolve_checkpoint,
    save_model_file,
)

__all__ = [
    "LoadedModel",
    "load_model",
    "read_model_config",
    "read_model_state",
    "read_optimizer_state",
    "resolve_checkpoint",
    "save_model_file",
]
