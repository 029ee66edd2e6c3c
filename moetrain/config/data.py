"""data.*: the text or token source, tokenizer, packing, mixtures (DataConfig)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from moetrain.config.errors import ConfigError, _require

# data.name values that are not Hugging Face Hub datasets: ours, and the `datasets` loaders for
# local files (data.data_files).
DATA_SOURCES = ("builtin", "fixture", "mixture", "tokens")
DATA_LOADERS = ("json", "text", "parquet", "csv", "arrow")
# data.on_exhausted: a mixture source (or the single source) that has been read once is read again in
# a new order (repeat) or ends the run with a checkpoint (stop).
ON_EXHAUSTED = ("repeat", "stop")
# data.token_dtype for headerless token files (.bin, OLMo-style raw .npy); .npy with a header and
# Megatron .bin with an .idx carry their own.
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64", "uint8")
# How data.name=text cuts files into documents (blank-line separated paragraphs by default).
TEXT_SPLITS = ("line", "paragraph", "file")
# Common names for a loader's file type that are not loader names themselves.
DATA_NAME_ALIASES = {
    "jsonl": "json",
    "jsonlines": "json",
    "ndjson": "json",
    "txt": "text",
    "plain": "text",
    "pq": "parquet",
    "feather": "arrow",
    "ipc": "arrow",
}


@dataclass
class DataConfig:
    name: str = "builtin"  # builtin | a datasets loader (json, text, parquet, csv) | a hub dataset name
    data_files: Any = None  # str, list or {split: files} for local loaders
    config_name: str | None = None
    split: str = "train"
    validation_split: str | None = None  # None: carve validation_fraction out of the train split
    validation_fraction: float = 0.005
    text_field: str = "text"
    text_split: str = "paragraph"  # data.name=text: one document per line | paragraph | file
    domain_field: str | None = "domain"
    seq_len: int = 256
    tokenizer: str | None = None  # None: the builtin BPE; else a name or path for AutoTokenizer
    vocab_size: int = 8192  # of the builtin BPE
    data_dir: str | None = None  # None: $MOETRAIN_DATA_DIR or ~/.cache/moetrain
    max_documents: int | None = None  # cap on documents (quick experiments)
    # data.name=mixture: a list of sources, each a mapping of the fields above (name, data_files,
    # text_field, ...) plus weight (> 0, normalised) and domain (a unique name; metrics use it).
    sources: list[Any] | None = None
    on_exhausted: str = "repeat"  # repeat | stop (see ON_EXHAUSTED)
    # Attention stays inside each EOS-terminated document of a packed block; positions restart at 0.
    document_masking: bool = False
    token_dtype: str | None = None  # data.name=tokens, headerless files only
    weight: float = 1.0  # as a mixture source
    domain: str | None = None  # as a mixture source (default: the source's name)
    # Keep only the documents whose domain_field value is this (e.g. one domain of the builtin corpus).
    select_domain: str | None = None

    def validate(self, prefix: str = "data") -> None:
        _require(bool(self.name), f"{prefix}.name", self.name, "must name a dataset ('builtin', 'json', ...)")
        guess = suggest_data_name(self.name)
        if guess is not None:
            raise ConfigError(
                f"{prefix}.name={self.name!r} is not a dataset loader: did you mean {prefix}.name={guess}? "
                f"(local files: {', '.join(DATA_LOADERS)} with {prefix}.data_files; "
                f"{' or '.join(DATA_SOURCES)}; any other name is a Hugging Face Hub dataset)"
            )
        _require(self.seq_len > 0, f"{prefix}.seq_len", self.seq_len, "must be a positive integer")
        _require(
            0 < self.validation_fraction < 1,
            f"{prefix}.validation_fraction",
            self.validation_fraction,
            "must be in (0, 1)",
        )
        _require(bool(self.text_field), f"{prefix}.text_field", self.text_field, "must name a text column")
        _require(
            self.text_split in TEXT_SPLITS,
            f"{prefix}.text_split",
            self.text_split,
            f"one of {', '.join(TEXT_SPLITS)} (documents of data.name=text files)",
        )
        _require(
            self.vocab_size >= 300,
            f"{prefix}.vocab_size",
            self.vocab_size,
            "must be >= 300 (bytes + specials)",
        )
        _require(
            self.on_exhausted in ON_EXHAUSTED,
            f"{prefix}.on_exhausted",
            self.on_exhausted,
            f"one of {', '.join(ON_EXHAUSTED)}",
        )
        _require(
            self.token_dtype is None or self.token_dtype in TOKEN_DTYPES,
            f"{prefix}.token_dtype",
            self.token_dtype,
            f"null (from the file) or one of {', '.join(TOKEN_DTYPES)}",
        )
        _require(
            isinstance(self.weight, (int, float)) and self.weight > 0 and math.isfinite(self.weight),
            f"{prefix}.weight",
            self.weight,
            "must be a positive number (a mixture source's share, normalised over the sources)",
        )
        if self.name == "tokens" and self.data_files is None:
            raise ConfigError(
                f"{prefix}.name=tokens needs {prefix}.data_files: token files (.npy, .bin), a glob, a "
                "list, {train: ..., validation: ...} or a folder written by python -m moetrain.data.prepare"
            )
        if self.name == "mixture":
            self.mixture_sources(prefix)
        elif self.sources is not None:
            raise ConfigError(
                f"{prefix}.sources is set but {prefix}.name={self.name!r}: use {prefix}.name=mixture "
                f"to train on the sources, or remove {prefix}.sources"
            )

    # Fields a mixture source takes from the mixture itself (one tokenizer, one block length).
    SHARED_FIELDS = ("seq_len", "tokenizer", "vocab_size", "data_dir", "document_masking", "on_exhausted")

    def mixture_sources(self, prefix: str = "data") -> list[DataConfig]:
        """``data.sources`` as validated configs: each source's own fields, the shared ones from the
        mixture, ``domain`` defaulting to the source's name. One-line errors name the source."""
        if not isinstance(self.sources, (list, tuple)) or not self.sources:
            raise ConfigError(
                f"{prefix}.name=mixture needs {prefix}.sources: a non-empty list of sources, e.g. "
                f"[{{name: json, data_files: a.jsonl, weight: 0.7, domain: web}}, ...]"
            )
        shared = {k: getattr(self, k) for k in self.SHARED_FIELDS}
        out: list[DataConfig] = []
        for i, raw in enumerate(self.sources):
            where = f"{prefix}.sources[{i}]"
            if not isinstance(raw, dict):
                raise ConfigError(f"{where} must be a mapping with name, weight, domain, ... (got {raw!r})")
            for key in self.SHARED_FIELDS:
                if key in raw and raw[key] != shared[key]:
                    raise ConfigError(
                        f"{where}.{key} is invalid: every source shares the mixture's {prefix}.{key} "
                        f"({shared[key]!r}); set it on {prefix} instead"
                    )
            if raw.get("name") in ("mixture", None) or "sources" in raw:
                raise ConfigError(f"{where}.name={raw.get('name')!r} is invalid: a source is not a mixture")
            if "weight" not in raw:
                raise ConfigError(f"{where}.weight is missing: give each source a positive weight")
            from moetrain.config.build import _build  # (build.py imports this module)

            src = _build(DataConfig, {**raw, **shared}, where)
            src.validate(where)
            if src.domain is None:
                src.domain = os.path.basename(str(src.name).rstrip("/")) or f"source{i}"
            out.append(src)
        domains = [s.domain for s in out]
        dupes = sorted({d for d in domains if domains.count(d) > 1})
        if dupes:
            raise ConfigError(
                f"{prefix}.sources: domain {dupes[0]!r} is used by more than one source; give each "
                "source its own domain (metrics are logged per domain)"
            )
        return out


def _edit_distance_at_most_one(a: str, b: str) -> bool:
    """One insertion, deletion, substitution or swap of neighbours turns ``a`` into ``b``."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def suggest_data_name(name: str) -> str | None:
    """The loader or source a ``data.name`` that is none of them most likely meant, or None.

    ``jsonl`` -> ``json``, ``txt`` -> ``text``, ``parqet`` -> ``parquet``, ``JSON`` -> ``json``. Names
    of local paths, hub ids (``owner/name``) and anything further from a known name are left alone:
    they may be real Hugging Face Hub datasets (``wikitext``).
    """
    known = DATA_SOURCES + DATA_LOADERS
    if not isinstance(name, str) or name in known or "/" in name or os.path.exists(name):
        return None
    low = name.lower().strip()
    if low in known:
        return low
    if low in DATA_NAME_ALIASES:
        return DATA_NAME_ALIASES[low]
    close = [k for k in known if _edit_distance_at_most_one(low, k)]
    return close[0] if len(close) == 1 else None
