"""Documents from any source through HF ``datasets``, tokenised (cached) and packed.

``data.name`` selects the source:

- ``builtin``: the default corpus (``moetrain.data.corpus``), built on first use;
- ``fixture``: the small corpus committed in ``moetrain/data/fixture`` (tests, smoke runs);
- ``json`` / ``text`` / ``parquet`` / ``csv`` / ``arrow``: a ``datasets`` loader over ``data.data_files``;
- anything else: a hub dataset (``data.config_name``, ``data.split``) or a local dataset folder.

Every failure a user can cause ends in a one-line ``DataError``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from moetrain.config import DATA_LOADERS, DataConfig
from moetrain.data import corpus
from moetrain.data.cache import TOKENIZED_VERSION, resolve_data_dir
from moetrain.data.errors import DataError
from moetrain.data.packed_cache import load_packed, packed_dir, packed_stats, save_packed
from moetrain.data.packing import PackedDataset, pack

LOADERS = DATA_LOADERS
FIXTURE_DIR = corpus.FIXTURE_DIR
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class Documents:
    train: datasets.Dataset
    validation: datasets.Dataset
    text_field: str
    domain_field: str | None  # None: the source has no domain column
    domains: list[str]
    key: str  # identity of the source's content, for cache keys


# ---------------------------------------------------------------------------------------------
# Loading


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _patterns(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for v in data_files.values() for p in _patterns(v)]
    return [str(p) for p in data_files]


def _check_local_files(name: str, data_files: Any) -> None:
    if data_files is None:
        raise DataError(
            f"data.name={name} needs data.data_files (a path, a glob, a list or {{split: files}})"
        )
    files = []
    for pattern in _patterns(data_files):
        if "://" in pattern:
            continue
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matches:
            raise DataError(f"data file not found: {pattern}")
        files.extend(matches)
    if files and all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"dataset {name} is empty: no data in {', '.join(sorted(files)[:3])}")


def _hub_offline() -> bool:
    """What huggingface_hub will do (it reads HF_HUB_OFFLINE once, at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_host() -> str:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return f"{url.hostname}:{url.port or 443}"


def _hub_reachable() -> bool:
    """A quick TCP probe, so that no network fails in seconds instead of after minutes of retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what a direct connection cannot
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _load(cfg: DataConfig, cache_dir: Path, verbose: bool) -> tuple[datasets.DatasetDict, str, str | None]:
    """(all splits, content key, validation split name or None to carve one)."""
    datasets.logging.set_verbosity_error()  # its progress bars and notes would drown ours
    datasets.disable_progress_bars()
    local = corpus.local_source(cfg.name, cfg.data_dir, verbose=verbose)
    if local is not None:
        files, key = local
        return datasets.load_dataset("json", data_files=files, cache_dir=str(cache_dir)), key, "validation"
    if cfg.name in LOADERS:
        _check_local_files(cfg.name, cfg.data_files)
        kwargs: dict[str, Any] = {"data_files": cfg.data_files}
        if cfg.name == "text":  # datasets' own names: one example per line | paragraph | document
            kwargs["sample_by"] = {"line": "line", "paragraph": "paragraph", "file": "document"}[
                cfg.text_split
            ]
    else:
        is_local = os.path.exists(cfg.name)
        if not is_local and not _hub_offline() and not _hub_reachable():
            raise DataError(
                f"cannot reach the Hugging Face Hub to load dataset {cfg.name!r} (data.name is not a "
                f"local folder nor one of {', '.join(('builtin', 'fixture', *LOADERS))}, so it is a Hub "
                f"dataset; no connection to {_hub_host()} within {HUB_PROBE_TIMEOUT_S:g} s): check the "
                f"network or HTTPS_PROXY, set HF_HUB_OFFLINE=1 to use a copy cached in {cache_dir}, "
                "or use local files (data.name=json|text|parquet|csv data.data_files=PATH)"
            )
        kwargs = {"name": cfg.config_name, "data_files": cfg.data_files}
    try:
        dsd = datasets.load_dataset(cfg.name, cache_dir=str(cache_dir), **kwargs)
    except Exception as e:  # network, missing config, parse errors...: many types, one message
        where = f"{cfg.name!r}" + (f" (config {cfg.config_name!r})" if cfg.config_name else "")
        offline_miss = isinstance(e, ConnectionError) or "offline" in str(e).lower()
        if cfg.name not in LOADERS and not os.path.exists(cfg.name) and _hub_offline() and offline_miss:
            raise DataError(
                f"could not load dataset {where}: HF_HUB_OFFLINE=1 is set (no downloads) and it is not "
                f"cached in {cache_dir}; unset HF_HUB_OFFLINE on a machine with network to download "
                "it once (same data.data_dir), or use local files (data.name=json data.data_files=PATH)"
            ) from e
        if cfg.name not in LOADERS and not os.path.exists(cfg.name) and "connection" in str(e).lower():
            raise DataError(
                f"could not load dataset {where} from the Hugging Face Hub: {_hub_host()} did not answer; "
                f"check the network or HTTPS_PROXY, or set HF_HUB_OFFLINE=1 to use a copy cached in {cache_dir}"
            ) from e
        raise DataError(f"could not load dataset {where}: {_first_line(e)}") from e
    if not isinstance(dsd, datasets.DatasetDict):
        raise DataError(f"dataset {cfg.name!r} did not load as a set of splits")
    key = f"{Path(cfg.name).name}-{dsd[next(iter(dsd))]._fingerprint}"
    return dsd, key, cfg.validation_split


def _split(dsd: datasets.DatasetDict, split: str, name: str) -> datasets.Dataset:
    if split not in dsd:
        raise DataError(f"dataset {name!r} has no split {split!r}; available: {', '.join(dsd)}")
    return dsd[split]


def _carve_validation(
    train: datasets.Dataset, fraction: float, name: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A fixed random subset (seed 0) becomes validation; both keep the original order."""
    n = len(train)
    if n < 2:
        raise DataError(f"dataset {name!r} has {n} document(s); carving a validation split needs at least 2")
    n_val = max(1, round(fraction * n))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(0).permutation(n)[:n_val]] = True
    return train.select(np.flatnonzero(~is_val)), train.select(np.flatnonzero(is_val))


def _select_domain(
    train: datasets.Dataset, validation: datasets.Dataset, cfg: DataConfig
) -> tuple[datasets.Dataset, datasets.Dataset]:
    field, wanted = cfg.domain_field, str(cfg.select_domain)
    if field is None or field not in train.column_names:
        raise DataError(
            f"select_domain={wanted!r} needs a domain column: dataset {cfg.name!r} has no column "
            f"{field!r} (set domain_field)"
        )
    keep = lambda batch: [str(d) == wanted for d in batch[field]]  # noqa: E731
    selected = train.filter(keep, batched=True), validation.filter(keep, batched=True)
    if len(selected[0]) == 0:
        found = sorted({str(d) for d in train.unique(field)})
        raise DataError(
            f"select_domain={wanted!r}: no document of dataset {cfg.name!r} has that {field!r}; "
            f"available: {', '.join(found[:10])}"
        )
    return selected


def load_documents(cfg: DataConfig, *, verbose: bool = True) -> Documents:
    cache_dir = resolve_data_dir(cfg.data_dir) / "hf"
    dsd, key, validation_split = _load(cfg, cache_dir, verbose)
    train = _split(dsd, cfg.split, cfg.name)
    if cfg.text_field not in train.column_names:
        raise DataError(
            f"text field {cfg.text_field!r} not in dataset {cfg.name!r}; "
            f"available columns: {', '.join(train.column_names)} (set data.text_field)"
        )
    if len(train) == 0:
        raise DataError(f"dataset {cfg.name!r} is empty (split {cfg.split!r} has no documents)")
    # Empty strings (e.g. blank lines of a `text` file) are not documents.
    non_empty = lambda batch: [bool(t) for t in batch[cfg.text_field]]  # noqa: E731
    train = train.filter(non_empty, batched=True)
    if len(train) == 0:
        raise DataError(f"dataset {cfg.name!r} is empty: every {cfg.text_field!r} value is blank")
    if validation_split is not None:
        validation = _split(dsd, validation_split, cfg.name).filter(non_empty, batched=True)
    else:
        train, validation = _carve_validation(train, cfg.validation_fraction, cfg.name)
    if cfg.select_domain is not None:
        train, validation = _select_domain(train, validation, cfg)
    if cfg.max_documents is not None:
        train = train.select(range(min(cfg.max_documents, len(train))))
    domain_field = cfg.domain_field if cfg.domain_field in train.column_names else None
    if domain_field is not None:
        names = {str(d) for d in train.unique(domain_field)}
        names |= (
            {str(d) for d in validation.unique(domain_field)}
            if domain_field in validation.column_names
            else set()
        )
        domains = sorted(names)
    else:
        domains = [Path(cfg.name).name]
    return Documents(train, validation, cfg.text_field, domain_field, domains, key)


# ---------------------------------------------------------------------------------------------
# Tokenising and packing


def tokenized_cache(docs: Documents, cfg: DataConfig, tokenizer_fp: str) -> tuple[Path, str]:
    """Where the tokenised splits of ``docs`` are cached, and the key (their fingerprint prefix)."""
    key = _cache_key(docs, cfg, tokenizer_fp)
    return resolve_data_dir(cfg.data_dir) / "tokenized" / key, key


def _cache_key(docs: Documents, cfg: DataConfig, tokenizer_fp: str) -> str:
    parts = [
        TOKENIZED_VERSION,
        docs.key,
        tokenizer_fp,
        cfg.split,
        cfg.validation_split,
        cfg.validation_fraction,
        cfg.text_field,
        docs.domain_field,
        docs.domains,
        cfg.max_documents,
    ]
    if cfg.name == "text":  # the other sources' keys stay as they were (existing caches keep working)
        parts.append(cfg.text_split)
    if cfg.select_domain is not None:
        parts.append(["select_domain", cfg.select_domain])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def tokenize(
    ds: datasets.Dataset,
    docs: Documents,
    tokenizer: PreTrainedTokenizerBase,
    cache_file: Path,
    fingerprint: str,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Per document: ``input_ids`` (with EOS appended) and ``domain_id``; cached in ``cache_file``."""
    backend = tokenizer.backend_tokenizer  # 2-3x faster than the transformers __call__
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets
    eos = tokenizer.eos_token_id
    domain_index = {d: i for i, d in enumerate(docs.domains)}

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encodings = encode_batch(batch[docs.text_field], add_special_tokens=False)
        n = len(encodings)
        domain_ids = (
            [domain_index[str(d)] for d in batch[docs.domain_field]] if docs.domain_field else [0] * n
        )
        return {"input_ids": [e.ids + [eos] for e in encodings], "domain_id": domain_ids}

    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32")), "domain_id": datasets.Value("int64")}
    )
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    return ds.map(
        encode,
        batched=True,
        batch_size=256,
        remove_columns=ds.column_names,
        features=features,
        cache_file_name=str(cache_file),
        new_fingerprint=fingerprint,
        num_proc=num_proc,
        desc=f"tokenizing {cache_file.stem}" if num_proc else None,
    )


def pack_tokenized(
    tokenized: datasets.Dataset, seq_len: int, domains: list[str], split: str
) -> PackedDataset:
    ids = tokenized.data.column("input_ids")
    token_ids = pc.list_flatten(ids).to_numpy()
    doc_lengths = pc.list_value_length(ids).to_numpy()
    doc_domains = tokenized.data.column("domain_id").to_numpy()
    return pack(token_ids, doc_lengths, doc_domains, seq_len, domains, split)


def tokenize_and_pack(
    docs: Documents, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, tokenizer_fp: str
) -> tuple[dict[str, PackedDataset], dict[str, Any]]:
    """Packed train/validation sets, memory-mapped from the packed cache (packed_cache.py; built on
    first use), and their statistics."""
    start = time.perf_counter()
    target = packed_dir(cfg, docs.key, tokenizer_fp)
    packed = load_packed(target)
    cached = packed is not None
    if packed is None:
        cache_dir, key = tokenized_cache(docs, cfg, tokenizer_fp)
        cached = all((cache_dir / f"{s}.arrow").is_file() for s in corpus.SPLITS)
        built = {}
        for split, ds in (("train", docs.train), ("validation", docs.validation)):
            tokenized = tokenize(ds, docs, tokenizer, cache_dir / f"{split}.arrow", f"{key}-{split}")
            built[split] = pack_tokenized(tokenized, cfg.seq_len, docs.domains, split)
        save_packed(target, built, docs.domains)
        packed = load_packed(target)  # every run reads its blocks the same way: memory-mapped
        assert packed is not None, f"packed cache {target} vanished while in use"
    stats = packed_stats(packed)
    stats["tokenize_seconds"] = round(time.perf_counter() - start, 3)
    stats["tokenize_cached"] = cached
    return packed, stats
