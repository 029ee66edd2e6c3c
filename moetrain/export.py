"""Export a checkpoint as a transformers model folder: ``python -m moetrain.export CHECKPOINT OUT_DIR``.

CHECKPOINT is a checkpoint folder, a ``checkpoints/`` folder or a run folder (its latest checkpoint).
OUT_DIR receives what ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
read: ``config.json``, ``generation_config.json``, ``model.safetensors`` and the checkpoint's tokenizer
(set to add bos like training, with ``model_max_length`` = the model's ``max_seq_len``). Files and
folders get the usual modes (0644 / 0755 under the common umask 022).
The architecture is the one the model came from, read off its options (``moetrain.hf.hf_architecture``):
``OlmoeForCausalLM`` (QK-norm over the whole projection), ``Qwen3MoeForCausalLM`` (per-head QK-norm,
also an upcycled Qwen3), ``Qwen2MoeForCausalLM`` (shared expert, q/k/v bias), otherwise
``MixtralForCausalLM`` (also an upcycled Mistral / Llama); dense models ``MistralForCausalLM`` or
``Qwen3ForCausalLM``.

What the target cannot hold is refused in one line: sigmoid router scores, and the
aux-loss-free expert-selection bias unless ``--drop-expert-bias`` (then exported without it and a
warning says the routing changes: the export chooses experts from the unbiased scores).

The folder is written under ``OUT_DIR.tmp-XXXX`` and renamed into place, so OUT_DIR is either absent
or complete; a non-empty OUT_DIR is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from moetrain.checkpoint import read_model_config, read_model_state, resolve_checkpoint
from moetrain.checkpoint.model_file import TOKENIZER_DIR

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ValueError):
    """A user-facing export problem; the message is one line."""


def _load_tokenizer(folder: Path) -> Any | None:
    if not (folder / TOKENIZER_DIR).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR), trust_remote_code=False)


def prepare_tokenizer(tokenizer: Any, max_seq_len: int) -> Any:
    """Make ``tokenizer(text)`` give the ids the model saw in training, and a real length limit.

    Training puts a separator before every document and generation starts prompts with bos (the
    builtin BPE's bos is its eos), so the exported tokenizer adds bos in front, written into
    ``tokenizer.json``'s post-processor so that every reader of the folder gets it.
    """
    tokenizer.model_max_length = max_seq_len
    bos = tokenizer.bos_token_id
    if bos is None or _starts_with_bos(tokenizer, bos):
        return tokenizer
    tokenizer.add_bos_token = True  # transformers rebuilds the post-processor
    if not _starts_with_bos(tokenizer, bos) and hasattr(tokenizer, "backend_tokenizer"):
        from tokenizers import processors

        bos_text = tokenizer.bos_token
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text}:1 $B:1", special_tokens=[(bos_text, bos)]
        )
    if not _starts_with_bos(tokenizer, bos):
        warnings.warn(
            f"the exported tokenizer ({type(tokenizer).__name__}) does not add bos: prepend token {bos} "
            "yourself to match training",
            stacklevel=2,
        )
    return tokenizer


def _starts_with_bos(tokenizer: Any, bos: int) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_modes(root: Path) -> None:
    """Modes of freshly created files and folders (0666 / 0777 minus the umask): the temporary
    folder would otherwise stay 0700 and some writers leave files 0600."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty (pass --force to replace it)")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing whatever is there (the caller checked --force)."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


BIAS_SUFFIX = ".ffn.router.expert_bias"


def _honour_ties(model_cfg: Any, state: dict[str, torch.Tensor], folder: Path) -> Any:
    """A tied model's file holds the embedding once and the export ties it (``tie_word_embeddings``).
    A file that holds its own, different head though the config ties it (written while the tie was
    lost, before 2026-12-05) was trained untied: exported untied, with a warning, so its logits stay."""
    from moetrain.model.transformer import declared_ties, untied_in_state

    broken = untied_in_state(state, declared_ties(model_cfg))
    if not broken:
        return model_cfg
    warnings.warn(
        f"{folder}: {broken[0]} differs from the tensor it is tied to (written while the tie was "
        "lost): exported untied (tie_word_embeddings=false), as it was trained",
        UserWarning,
        stacklevel=3,
    )
    return dataclasses.replace(model_cfg, tie_embeddings=False)


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    dtype: str | None = None,
    drop_expert_bias: bool = False,
    adapter: bool = False,
) -> dict[str, Any]:
    """Write the transformers folder for ``checkpoint`` to ``out_dir``; return a summary dict.

    ``dtype`` (fp32 | bf16 | fp16) casts the weights; None keeps the checkpoint's dtype.
    ``drop_expert_bias`` exports a model trained with aux-loss-free balancing without its
    expert-selection bias (a warning says so: the exported routing differs); without it such a
    checkpoint is refused. A LoRA checkpoint (``model.lora.rank`` > 0) is merged into its base (the
    base it refers to is checked first); ``adapter`` writes a PEFT adapter folder instead
    (moetrain/peft_adapter.py).
    """
    from transformers import GenerationConfig

    from moetrain.hf import hf_architecture, hf_model_from_state

    folder = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype={dtype!r} is invalid: one of {tuple(DTYPES)}")
    try:
        model_cfg = read_model_config(folder)
    except KeyError as e:
        raise ExportError(f"{folder}/config.yaml has no {e} section") from e
    dropping_bias = drop_expert_bias and (model_cfg.moe.bias_update_rate > 0 or model_cfg.moe.selection_bias)
    if dropping_bias:
        model_cfg = dataclasses.replace(
            model_cfg, moe=dataclasses.replace(model_cfg.moe, bias_update_rate=0.0, selection_bias=False)
        )
    arch = hf_architecture(model_cfg)  # refuses what transformers cannot hold, before any heavy work
    state = read_model_state(folder)
    if adapter and not model_cfg.lora.rank:
        raise ExportError(
            f"--adapter: {folder} is not a LoRA checkpoint (model.lora.rank=0); export it without --adapter"
        )
    if model_cfg.lora.rank:
        return _export_lora(
            folder,
            out_dir,
            model_cfg,
            state,
            force=force,
            dtype=dtype,
            adapter=adapter,
            drop_expert_bias=drop_expert_bias,
        )
    if dropping_bias:
        biases = {k: state.pop(k) for k in [k for k in state if k.endswith(BIAS_SUFFIX)]}
        largest = max((float(b.abs().max()) for b in biases.values()), default=0.0)
        warnings.warn(
            f"dropped the expert-selection bias of {len(biases)} MoE layers (largest |bias| {largest:.4g}): "
            "the exported Mixtral chooses experts from the unbiased router scores, so its routing and "
            "logits differ from the trained model's",
            stacklevel=2,
        )
    model_cfg = _honour_ties(model_cfg, state, folder)
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    tokenizer = _load_tokenizer(folder)
    if tokenizer is not None and len(tokenizer) > model_cfg.vocab_size:
        raise ExportError(
            f"the tokenizer in {folder / TOKENIZER_DIR} has {len(tokenizer)} tokens, more than the "
            f"model's vocab_size={model_cfg.vocab_size}"
        )
    hf_model = hf_model_from_state(model_cfg, state, tokenizer)
    hf_model.generation_config = GenerationConfig(
        bos_token_id=hf_model.config.bos_token_id,
        eos_token_id=hf_model.config.eos_token_id,
        pad_token_id=hf_model.config.pad_token_id,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hf_model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            prepare_tokenizer(tokenizer, model_cfg.max_seq_len).save_pretrained(str(tmp))
        _normal_modes(tmp)
        _check_out_dir(out_dir, force)  # someone may have written there meanwhile
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(p.numel() for p in {id(p): p for p in hf_model.parameters()}.values())
    return {
        "checkpoint": str(folder),
        "out_dir": str(out_dir),
        "architecture": arch,
        "params": params,
        "num_experts": model_cfg.num_experts,
        "top_k": model_cfg.top_k,
        "dtype": str(state["embed.weight"].dtype).removeprefix("torch."),
        "tokenizer": tokenizer is not None,
    }


def _export_lora(
    folder: Path,
    out_dir: Path,
    model_cfg: Any,
    adapters: dict[str, torch.Tensor],
    *,
    force: bool,
    dtype: str | None,
    adapter: bool,
    drop_expert_bias: bool,
) -> dict[str, Any]:
    """A LoRA checkpoint: its adapters merged into the base it refers to (written as any checkpoint
    is), or with ``adapter`` a PEFT adapter folder for that base."""
    from moetrain.checkpoint.base_ref import KEY, base_state, check_base
    from moetrain.checkpoint.manager import read_trainer_state
    from moetrain.config import LoRAConfig
    from moetrain.model.lora import merge_lora

    ref = read_trainer_state(folder).get(KEY)
    if not ref:
        raise ExportError(
            f"{folder} is a LoRA checkpoint without a base reference ({KEY} in trainer_state.json)"
        )
    check_base(ref, folder)
    base = base_state(ref, model_cfg)
    if adapter:
        if "path" not in ref:
            raise ExportError(
                "--adapter needs a transformers base folder (model.init_from); this run's base is a random "
                "init: export the merged model instead (without --adapter)"
            )
        from moetrain.peft_adapter import write_peft_adapter

        tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            info = write_peft_adapter(model_cfg, base, adapters, tmp, ref["path"])
            _normal_modes(tmp)
            _check_out_dir(out_dir, force)
            _move_into_place(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {"checkpoint": str(folder), "out_dir": str(out_dir), "adapter": True, **info}
    merged = merge_lora({**base, **adapters}, model_cfg.lora)
    merged_dir = Path(tempfile.mkdtemp(prefix="moetrain-lora-merged-"))
    try:  # a plain checkpoint folder of the merged weights, exported as every checkpoint is
        from moetrain.checkpoint.model_file import read_config, save_model_file
        from moetrain.config import to_dict

        config = read_config(folder)
        config["model"] = to_dict(dataclasses.replace(model_cfg, lora=LoRAConfig()))
        save_model_file(merged, merged_dir, config)
        if (folder / TOKENIZER_DIR).is_dir():
            shutil.copytree(folder / TOKENIZER_DIR, merged_dir / TOKENIZER_DIR)
        summary = export(merged_dir, out_dir, force=force, dtype=dtype, drop_expert_bias=drop_expert_bias)
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)
    return {**summary, "checkpoint": str(folder), "merged_lora": True}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moetrain.export",
        description="Export a moetrain checkpoint as a transformers model folder (Mixtral, OLMoE, Qwen2-MoE, "
        "Qwen3-MoE or, dense, Mistral / Qwen3: the architecture the model came from).",
    )
    parser.add_argument("checkpoint", help="checkpoint folder, checkpoints/ folder or run folder")
    parser.add_argument("out_dir", help="folder to write (must be absent or empty unless --force)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="cast weights (default: as stored)"
    )
    parser.add_argument(
        "--drop-expert-bias",
        action="store_true",
        help="export a model trained with aux-loss-free balancing without its expert-selection bias "
        "(transformers' MoEs have none; the exported routing then differs, and a warning says so)",
    )
    parser.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run: write a PEFT adapter folder for its base model instead of merged weights",
    )
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr to our one-line summaries
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            summary = export(
                args.checkpoint,
                args.out_dir,
                force=args.force,
                dtype=args.dtype,
                drop_expert_bias=args.drop_expert_bias,
                adapter=args.adapter,
            )
        for w in caught:
            if "moetrain/hf/" in w.filename or w.filename.endswith("moetrain/export.py"):
                print(f"warning: {_first_line(w.message)}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except (ValueError, OSError, yaml.YAMLError) as e:  # ConfigError / CheckpointError are ValueErrors
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    if summary.get("adapter"):
        print(
            f"exported {summary['checkpoint']} -> {summary['out_dir']} (PEFT LoRA adapter, rank "
            f"{summary['rank']}, {summary['modules']} adapted weights; load with "
            "peft.PeftModel.from_pretrained(base, OUT))"
        )
        return 0
    experts = f"{summary['num_experts']} experts top-{summary['top_k']}, " if summary["num_experts"] else ""
    print(
        f"exported {summary['checkpoint']} -> {summary['out_dir']} ({summary['architecture']}, "
        f"{summary['params'] / 1e6:.2f}M params, {experts}{summary['dtype']}, "
        f"tokenizer: {'yes' if summary['tokenizer'] else 'no'})"
    )
    return 0


if __name__ == "__main__":
    from moetrain.cli import quiet_cpu_accelerator, skip_exit_collection

    skip_exit_collection()
    quiet_cpu_accelerator()
    sys.exit(main())
