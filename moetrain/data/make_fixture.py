"""Regenerate the committed fixture corpus (``moetrain/data/fixture``) from the builtin corpus.

    python -m moetrain.data.make_fixture [--data-dir D] [--out moetrain/data/fixture]

Deterministic: per domain, documents in the order of their id hash (the same hash that splits the
corpus), sources taken in turn, each cut to an excerpt of whole lines, until the domain's character
budget is met.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from moetrain.data.corpus import (
    FIXTURE_DIR,
    SPLITS,
    Document,
    build_corpus,
    doc_hash,
    read_jsonl,
    split_stats,
    write_jsonl,
)

CHARS_PER_DOMAIN = {"train": 300_000, "validation": 12_000}
EXCERPT_CHARS = 4_000


def excerpt(text: str, max_chars: int = EXCERPT_CHARS) -> str:
    """Whole lines, at most ``max_chars``; long texts are cut from their first third (past front matter)."""
    if len(text) <= max_chars:
        return text
    start = text.find("\n", len(text) // 3) + 1 if len(text) > 3 * max_chars else 0
    end = text.rfind("\n", start, start + max_chars) + 1
    return text[start : end if end > start else start + max_chars]


def select(docs: list[Document], chars_per_domain: int) -> list[Document]:
    """Per domain, take one excerpt from each source in turn (so Milton is not drowned by the KJV)."""
    queues: dict[str, dict[str, list[Document]]] = defaultdict(lambda: defaultdict(list))
    for doc in sorted(docs, key=lambda d: doc_hash(d["id"])):
        queues[doc["domain"]][doc["source"]].append(doc)
    chosen = []
    for domain in sorted(queues):
        sources = [queues[domain][s] for s in sorted(queues[domain])]
        used = 0
        while used < chars_per_domain and any(sources):
            for queue in sources:
                if queue and used < chars_per_domain:
                    doc = queue.pop(0)
                    chosen.append({**doc, "text": excerpt(doc["text"])})
                    used += len(chosen[-1]["text"])
    return chosen


def make_fixture(corpus_dir: Path, out_dir: Path = FIXTURE_DIR) -> dict[str, dict[str, dict[str, int]]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in SPLITS:
        docs = select(read_jsonl(corpus_dir / f"{split}.jsonl"), CHARS_PER_DOMAIN[split])
        write_jsonl(out_dir / f"{split}.jsonl", docs)
        stats[split] = split_stats(docs)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR)
    args = parser.parse_args(argv)
    for split, domains in make_fixture(build_corpus(args.data_dir), args.out).items():
        print(split, domains, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
