"""Tokenize a text source once into token files: ``python -m moetrain.data.prepare OUT_DIR [data.*=...]``.

Writes ``OUT_DIR/train.npy`` and ``OUT_DIR/validation.npy`` (1-D ``.npy``, uint16 when the tokenizer
has at most 65,536 ids, else uint32; every document followed by EOS), the tokenizer
(``tokenizer.json`` ...) and ``meta.json``. Train on them with
``data.name=tokens data.data_files=OUT_DIR`` (or as a mixture source). The documents, their order,
the tokenizer and the validation split are those the text loader itself uses for the same ``data.*``
settings, so the two train on the very same blocks.

Options are the training command's ``data.*`` overrides (``data.name=json data.data_files=...``,
``data.tokenizer=...``); ``--workers N`` tokenizes in N processes. Nothing is written under the final
names until each file is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from moetrain.config import ConfigError, DataConfig, train_config_from_dict
from moetrain.data.errors import DataError
from moetrain.data.tokens import META_FILE, write_npy


def data_config(overrides: list[str]) -> DataConfig:
    """The ``data`` section composed by Hydra from the packaged configs and ``data.*`` overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    bad = [o for o in overrides if not o.lstrip("+").startswith("data")]
    if bad:
        raise ConfigError(f"{bad[0]!r}: prepare takes data.* overrides only (data.name=..., data.data_files=...)")
    from moetrain import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    values = OmegaConf.to_container(cfg, resolve=True)
    return train_config_from_dict(values, cross_checks=False).data  # type: ignore[arg-type]


def prepare(cfg: DataConfig, out_dir: Path, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    import datasets
    import pyarrow.compute as pc
    from tqdm import tqdm

    from moetrain.data.datasets import load_documents, tokenize, tokenized_cache
    from moetrain.data.tokenizer import load_or_train_tokenizer, tokenizer_fingerprint

    cfg.validate()
    if cfg.name in ("mixture", "tokens"):
        raise DataError(f"data.name={cfg.name}: prepare tokenizes one text source (builtin, json, text, ...)")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / META_FILE).is_file():
        raise DataError(f"{out_dir} exists and holds other files: choose an empty or new folder")
    start = time.perf_counter()
    docs = load_documents(cfg, verbose=progress)
    texts = (t for batch in docs.train.iter(batch_size=1000) for t in batch[docs.text_field])
    tokenizer = load_or_train_tokenizer(cfg, texts, corpus_key=docs.key, verbose=progress)
    fingerprint = tokenizer_fingerprint(tokenizer)
    cache_dir, key = tokenized_cache(docs, cfg, fingerprint)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)
    if progress:
        datasets.enable_progress_bars()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "format": "1-D .npy token ids, every document followed by eos_token_id",
        "dtype": dtype.name,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "source": docs.key,
        "tokens": {},
        "documents": {},
    }
    for split, ds in (("train", docs.train), ("validation", docs.validation)):
        tokenized = tokenize(ds, docs, tokenizer, cache_dir / f"{split}.arrow", f"{key}-{split}", workers)
        ids = tokenized.data.column("input_ids")
        total = int(pc.sum(pc.list_value_length(ids)).as_py() or 0)
        chunks = (pc.list_flatten(chunk).to_numpy().astype(dtype) for chunk in ids.chunks)
        bar = tqdm(total=total, desc=f"writing {split}.npy", unit="tok", disable=not progress, file=sys.stderr)
        write_npy(out_dir / f"{split}.npy", chunks, total, dtype, progress=bar.update)
        bar.close()
        meta["tokens"][split] = total
        meta["documents"][split] = len(tokenized)
    tokenizer.save_pretrained(out_dir)
    meta["seconds"] = round(time.perf_counter() - start, 2)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moetrain.data.prepare",
        description="Tokenize a text source into .npy token files for data.name=tokens.",
    )
    parser.add_argument("out_dir", help="folder to write train.npy, validation.npy, the tokenizer, meta.json")
    parser.add_argument("overrides", nargs="*", help="data.* settings, as for training (data.name=json ...)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        meta = prepare(data_config(args.overrides), Path(args.out_dir), args.workers, not args.no_progress)
    except (ValueError, OSError) as e:  # ConfigError / DataError are ValueErrors
        lines = str(e).strip().splitlines()
        print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out_dir}: {meta['tokens']['train']:,} train + {meta['tokens']['validation']:,} validation "
        f"tokens ({meta['dtype']}, eos {meta['eos_token_id']}) in {meta['seconds']} s; train with "
        f"data.name=tokens data.data_files={args.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
