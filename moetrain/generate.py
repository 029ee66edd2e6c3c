"""Sample text from a checkpoint or an exported folder.

    python -m moetrain.generate PATH prompt="To be, or not to be" [max_new_tokens=40 temperature=0.8
        top_p=0.95 seed=0 device=auto ignore_eos=false]

``key=value`` (Hydra style) and ``--key value`` both work. PATH is a checkpoint folder, a
``checkpoints/`` folder or a run folder (our model, with a KV cache), or a folder written by
``moetrain.export`` or any transformers causal-LM folder with a ``config.json`` (transformers'
``generate``). Temperature 0 is greedy decoding; ``top_p`` keeps the smallest set of most likely
tokens whose probability reaches it (nucleus sampling). The text (prompt + completion) goes to
stdout, a one-line timing summary to stderr.

``generate_tokens`` is the sampling loop the trainer also uses for its end-of-run sample.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def sample_next_token(
    logits_BV: torch.Tensor, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row, [B] int64: argmax when ``temperature == 0``, else nucleus sampling.

    ``generator`` may live on another device than the logits (a CPU generator with CUDA logits):
    the draw then happens on the generator's device, so a seed gives the same tokens everywhere.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is invalid: must be in (0, 1]")
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = F.softmax(logits_BV / temperature, dim=-1)
    device = probs_BV.device
    if generator is not None and generator.device.type != device.type:
        probs_BV = probs_BV.cpu() if generator.device.type == "cpu" else probs_BV.to(generator.device)
    if top_p >= 1:
        return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1).to(device)
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    # Drop a token when the more likely ones already reach top_p (the most likely one always stays).
    drop_BV = sorted_BV.cumsum(dim=-1) - sorted_BV >= top_p
    choice_B1 = torch.multinomial(sorted_BV.masked_fill(drop_BV, 0.0), 1, generator=generator)
    return order_BV.gather(-1, choice_B1).squeeze(-1).to(device)


def _is_moetrain_model(model: Any) -> bool:
    from moetrain.model import MoETransformer

    return isinstance(model, MoETransformer)


@torch.no_grad()
def generate_tokens(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    *,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend ``input_ids`` ([T] or [B, T]) by up to ``max_new_tokens`` sampled tokens.

    Returns prompt + new tokens, [B, T + n] (or [T + n] for a 1-D prompt), int64, on the model's
    device. Stops early once every row has produced ``eos_token_id`` (rows that finished earlier are
    filled with eos); with ``eos_token_id=None`` exactly ``max_new_tokens`` are generated.

    ``model`` is a ``MoETransformer`` (a DeepSpeed engine is unwrapped), which decodes with one
    ``KVCache`` per layer unless ``use_cache=False``, or any module whose output has ``.logits``
    (recomputed over the whole sequence each step). The model runs in eval mode and gets its
    training mode back afterwards. Under expert parallelism every rank must call this with the same
    prompt and an identically seeded ``generator``: the all-to-alls need all ranks at every step.
    """
    from moetrain.model.attention import KVCache

    model = getattr(model, "module", model)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 0")
    squeeze = input_ids.dim() == 1
    ids_BT = input_ids[None] if squeeze else input_ids
    if ids_BT.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. bos)")
    device = next(model.parameters()).device
    ids_BT = ids_BT.to(device=device, dtype=torch.long)
    eos_ids = None
    if eos_token_id is not None:
        eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos_ids = torch.tensor(eos_list, device=device, dtype=torch.long)
    caches = None
    if use_cache and _is_moetrain_model(model):
        caches = [KVCache() for _ in model.layers]
    finished_B = torch.zeros(ids_BT.shape[0], dtype=torch.bool, device=device)
    pieces = [ids_BT]
    step_input = ids_BT
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if caches is not None:
                logits_BV = model(step_input, caches=caches).logits[:, -1]
            else:
                logits_BV = model(torch.cat(pieces, dim=1)).logits[:, -1]
            next_B = sample_next_token(logits_BV, temperature, top_p, generator)
            if eos_ids is not None:
                next_B = torch.where(finished_B, eos_ids[0], next_B)
                finished_B |= torch.isin(next_B, eos_ids)
            step_input = next_B[:, None]
            pieces.append(step_input)
            if eos_ids is not None and bool(finished_B.all()):
                break
    finally:
        model.train(was_training)
    out = torch.cat(pieces, dim=1)
    return out[0] if squeeze else out


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt``, starting with bos when the tokenizer has one (documents follow a
    separator in training, and the builtin BPE's bos is its eos)."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no bos token to start from")
    return ids


def is_hf_folder(path: str | Path) -> bool:
    from moetrain.checkpoint.model_file import CONFIG_FILE, MODEL_FILE

    p = Path(path)
    return (p / "config.json").is_file() and not ((p / MODEL_FILE).is_file() and (p / CONFIG_FILE).is_file())


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def generate_text(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    device: str = "auto",
    ignore_eos: bool = False,
) -> tuple[str, int]:
    """Prompt + completion as text, and the number of new tokens. See the module docstring."""
    dev = _resolve_device(device)
    if is_hf_folder(path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Never code or pickles from the folder: no remote code, safetensors weights only.
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        model = (
            AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, use_safetensors=True)
            .to(dev)
            .eval()
        )
        ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=dev)
        eos = None if ignore_eos else model.generation_config.eos_token_id
        pad = model.generation_config.pad_token_id
        pad = tokenizer.pad_token_id if pad is None else pad
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
        torch.manual_seed(seed)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if ignore_eos else None,
            eos_token_id=eos,
            pad_token_id=pad,
            **(sampling if temperature > 0 else {"do_sample": False}),
        )[0]
    else:
        from moetrain.checkpoint import load_model

        loaded = load_model(path, device=str(dev))
        tokenizer = loaded.tokenizer
        if tokenizer is None:
            raise ValueError(f"{loaded.folder} has no tokenizer/ folder: cannot encode the prompt")
        ids = torch.tensor(encode_prompt(tokenizer, prompt), device=dev)
        generator = torch.Generator(device=dev).manual_seed(seed)
        out = generate_tokens(
            loaded.model,
            ids,
            max_new_tokens,
            temperature,
            top_p,
            eos_token_id=None if ignore_eos else tokenizer.eos_token_id,
            generator=generator,
        )
    text = tokenizer.decode(out.tolist(), skip_special_tokens=True)
    return text, out.numel() - ids.numel()


# The command line's options: generate_text's keyword arguments, each (type, default, help).
_OPTIONS: dict[str, tuple[type, Any, str]] = {
    "prompt": (str, "To be, or not to be", "text to continue"),
    "max_new_tokens": (int, 40, "tokens to generate at most"),
    "temperature": (float, 0.8, "0 = greedy"),
    "top_p": (float, 0.95, "nucleus sampling mass, in (0, 1]"),
    "seed": (int, 0, "sampling seed"),
    "device": (str, "auto", "auto | cpu | cuda | cuda:N"),
    "ignore_eos": (str, "false", "true: always generate max_new_tokens"),
}


def _to_dashed(argv: list[str]) -> list[str]:
    """Turn ``key=value`` arguments (Hydra style) into ``--key value``; leave the rest alone."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and not arg.startswith("-") and key in (*_OPTIONS, "path", "checkpoint"):
            out += ["--path" if key in ("path", "checkpoint") else f"--{key}", value]
        else:
            out.append(arg)
    return out


def _parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"ignore_eos={value!r} is invalid: true or false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moetrain.generate",
        description="Sample from a moetrain checkpoint or an exported transformers folder.",
    )
    parser.add_argument("pos_path", nargs="?", metavar="PATH", help="checkpoint / run folder or HF folder")
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    for name, (typ, default, help_) in _OPTIONS.items():
        parser.add_argument(f"--{name}", type=typ, default=default, help=f"{help_} (default: {default})")
    args = parser.parse_args(_to_dashed(sys.argv[1:] if argv is None else argv))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr to our one-line summaries
    path = args.path or args.pos_path
    if path is None:
        parser.error("give a checkpoint, run or exported folder")
    options = {name: getattr(args, name) for name in _OPTIONS}  # generate_text's keyword arguments
    options["ignore_eos"] = _parse_bool(options["ignore_eos"])
    start = time.perf_counter()
    try:
        text, n = generate_text(path, **options)
    except (ValueError, OSError) as e:  # CheckpointError / ConfigError are ValueErrors
        lines = str(e).strip().splitlines()
        print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(text)
    print(f"moetrain: {n} new tokens in {seconds:.2f} s (including loading)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from moetrain.cli import quiet_cpu_accelerator, skip_exit_collection

    skip_exit_collection()
    quiet_cpu_accelerator()
    sys.exit(main())
