"""What document masking (``data.document_masking=true``) costs: a training forward + backward of a
model with plain causal attention vs the same batch with per-document masks, interleaved in one process.

Variants, each on the same batch, in turn, every repeat (background load hits all alike):
- ``causal``: SDPA ``is_causal=True`` (what every step runs without masking);
- ``masked``: the boolean [B, 1, T, T] block-diagonal causal mask built from ``document_ids``
  (model/documents.py) and positions restarting per document, as the trainer runs it;
- ``attention_causal`` / ``attention_masked``: one attention layer alone (forward + backward), the
  part that changes.

Blocks hold documents of ``--doc-len`` tokens on average (EOS at random places). Reports median ms and
the masked / causal ratio of medians and the median of per-round ratios.

    python benchmarks/bench_document_masking.py --model mixtral_small --seq-len 256 --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moetrain.config import model_config_from_dict
from moetrain.data.loader import document_ids
from moetrain.model.documents import document_mask, document_positions
from moetrain.model.transformer import MoETransformer


def model_config(name: str, vocab: int):
    """The model preset ``name`` as the training command composes it (Hydra), with ``vocab`` ids."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moetrain import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", f"data.vocab_size={vocab}"])
    values = OmegaConf.to_container(cfg.model, resolve=True)
    values["vocab_size"] = vocab
    return model_config_from_dict(values)


def batch(b: int, t: int, vocab: int, doc_len: float, eos: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (b, t + 1), generator=g)
    ids[torch.rand(b, t + 1, generator=g) < 1.0 / doc_len] = eos
    return ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mixtral_small")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--doc-len", type=float, default=64.0)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = model_config(args.model, args.vocab)
    model = MoETransformer(cfg).train()
    attn = model.layers[0].attention
    eos = 0
    blocks = batch(args.batch, args.seq_len, args.vocab, args.doc_len, eos, 0)
    ids, labels = blocks[:, :-1], blocks[:, 1:]
    docs = document_ids(ids, eos)
    x = torch.randn(args.batch, args.seq_len, cfg.hidden_size, requires_grad=True)
    T = args.seq_len

    def step(masked: bool) -> None:
        model.zero_grad(set_to_none=True)
        out = model(ids, labels, document_ids_BT=docs if masked else None)
        out.loss.backward()

    def attention(masked: bool) -> None:
        if masked:
            cos, sin = model.rope(document_positions(docs).reshape(-1), x.dtype)
            rope = (cos.view(args.batch, 1, T, -1), sin.view(args.batch, 1, T, -1))
            y = attn(x, rope, mask=document_mask(docs, cfg.sliding_window))
        else:
            y = attn(x, model.rope(torch.arange(T), x.dtype))
        y.sum().backward()

    variants = {
        "causal": lambda: step(False),
        "masked": lambda: step(True),
        "attention_causal": lambda: attention(False),
        "attention_masked": lambda: attention(True),
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    paired = {
        "step": statistics.median(m / c for m, c in zip(times["masked"], times["causal"])),
        "attention": statistics.median(
            m / c for m, c in zip(times["attention_masked"], times["attention_causal"])
        ),
    }
    docs_per_block = float((docs[:, -1] + 1).float().mean())
    print(
        f"{args.model} B{args.batch} T{T} ({docs_per_block:.1f} documents per block), {torch.get_num_threads()} threads"
    )
    for k, v in med.items():
        print(f"  {k:18s} {v:8.1f} ms")
    print(
        f"  masked/causal: step {med['masked'] / med['causal']:.3f} (paired {paired['step']:.3f}), "
        f"attention layer {med['attention_masked'] / med['attention_causal']:.3f} (paired {paired['attention']:.3f})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"median_ms": med, "paired_ratio": paired, "docs_per_block": docs_per_block, **vars(args)},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
